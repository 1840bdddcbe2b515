import pytest
import torch
import torch.nn.functional as F

from lmlab.models.dropout import Dropout
from lmlab.models.gpt import GPTLM, PRESETS, GPTConfig
from lmlab.models.kv_cache import KVCache
from lmlab.parameters import parameter_counts


def tiny_model(seed: int = 0, dropout: float = 0.0) -> GPTLM:
    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=dropout
    )
    return GPTLM(config).eval()


def test_changing_token_t_leaves_earlier_logits_unchanged():
    model = tiny_model()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    t = 9
    changed[:, t] = (idx[:, t] + 1) % 50
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=0)
    assert not torch.allclose(before[:, t:], after[:, t:])


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny_model().train()
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(2))
    inputs, targets = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 3.5  # about log(50) at initialisation
    assert loss.item() < 0.05


def test_output_layer_is_tied_to_embedding_and_counted_once():
    model = tiny_model()
    assert model.lm_head.weight is model.token_embedding.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    counts = parameter_counts(model)
    assert sum(counts.values()) == sum(unique.values())
    assert counts["embeddings"] == 50 * 32 + 16 * 32


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=1000, block_size=16, n_layer=8, n_embd=256, n_head=4)
    model = GPTLM(config)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    proj = model.blocks[0].mlp.proj.weight.std().item()
    assert proj == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.05)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)


def test_kv_cache_prefill_then_steps_matches_full_forward():
    model = tiny_model()
    idx = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_state(3)
        pieces = [model(idx[:, :5], state=cache)]  # prefill 5 positions at once
        pieces += [model(idx[:, i : i + 1], state=cache) for i in range(5, 9)]
        pieces.append(model(idx[:, 9:], state=cache))  # several positions after a prefix
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12


def test_sequence_longer_than_block_size_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=30, n_head=4), "divisible"),
        (dict(dropout=1.5), r"model.dropout must be in \[0, 1\)"),
        (dict(attn_dropout=1.0), r"model.attn_dropout must be in \[0, 1\), got 1.0"),
        (dict(n_layer=0), "model.n_layer must be a positive integer"),
        (dict(vocab_size=-3), "model.vocab_size must be a positive integer"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_presets_build_and_small_has_the_documented_shape():
    for preset in PRESETS.values():
        GPTConfig(**preset)  # every preset is valid
    small = GPTConfig(**PRESETS["small"])
    assert (small.n_layer, small.n_embd, small.n_head) == (2, 256, 4)
    assert GPTConfig(**small.to_dict()) == small


def test_kv_cache_reorder_follows_the_chosen_rows():
    model = tiny_model()
    idx = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model.new_state(3)
        model(idx, state=cache)
        cache.reorder(torch.tensor([2, 2, 0]))  # same batch size: in place
        step = torch.tensor([[5], [6], [7]])
        reordered = model(step, state=cache)[:, -1]
        expected = model(torch.cat([idx[[2, 2, 0]], step], dim=1))[:, -1]
    torch.testing.assert_close(reordered, expected, rtol=1e-5, atol=1e-5)
    cache.reorder(torch.tensor([1]))  # a different batch size: a new buffer
    assert cache.keys.shape[1] == 1 and cache.length == 7


def test_kv_cache_reorder_copies_only_moved_rows_after_keep():
    cache = KVCache(n_layer=1, batch_size=3, n_head=1, head_dim=4, max_len=8)
    cache.length = 5
    for row in range(3):
        cache.keys[:, row] = row
        cache.values[:, row] = 10 + row
    cache.reorder(torch.tensor([1, 0, 2]), keep=3)  # rows 0 and 1 swap from position 3 on
    assert cache.keys[0, :, 0, :, 0].tolist() == [
        [0, 0, 0, 1, 1, 0, 0, 0],  # positions past `length` are never touched
        [1, 1, 1, 0, 0, 1, 1, 1],
        [2, 2, 2, 2, 2, 2, 2, 2],
    ]
    assert cache.values[0, :, 0, 3:5, 0].tolist() == [[11, 11], [10, 10], [12, 12]]


def test_a_cached_one_token_step_asked_for_the_loss_returns_the_loss():
    # The step itself is checked against the module path in test_families.py.
    model = tiny_model()
    idx = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = model.new_state(3, max_len=9)
        model(idx[:, :8], state=cache)
        loss = model(idx[:, 8:], state=cache, targets=torch.tensor([[1], [2], [3]]))
        logits = model(idx)[:, -1]
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([1, 2, 3])))


def test_decoding_reads_the_weights_as_they_are_at_each_call():
    # The one-token step reads transposed copies of the matrices, made once per KV cache: a
    # decoding call after the weights change (training between two samples) must see the new
    # weights, not copies left from the call before.
    from lmlab.decoding import generate

    model = tiny_model()
    prompt = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(6))
    before = generate(model, prompt, 12, temperature=0)
    cache = model.new_state(2, max_len=4)
    with torch.no_grad():
        model(prompt, state=cache)
        model(prompt[:, :1], state=cache)
        layers, _ = cache.step_weights
        qkv_t = layers[0][0]
        assert qkv_t.is_contiguous() and torch.equal(qkv_t, model.blocks[0].attn.qkv.weight.t())
        for param in model.parameters():
            param.mul_(-1.5)
    after = generate(model, prompt, 12, temperature=0)
    assert not torch.equal(before, after)
    assert torch.equal(after, generate(model, prompt, 12, temperature=0, use_cache=False))


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_dropout_keeps_one_minus_p_of_the_values_scaled_to_keep_the_mean(p: float):
    dropout = Dropout(p).train()
    x = torch.ones(1_000_003, requires_grad=True)  # an odd size: not a multiple of 4 draws
    y = dropout(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.002)
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)
    assert torch.unique(y[kept]).tolist() == pytest.approx([65536 / (65536 - round(p * 65536))])
    (grad,) = torch.autograd.grad(y, x, torch.full_like(x, 3.0))
    torch.testing.assert_close(grad, 3.0 * y.detach(), rtol=0, atol=0)  # the same mask


def test_dropout_masks_are_independent_and_follow_the_torch_seed():
    dropout = Dropout(0.5).train()
    torch.manual_seed(3)
    first = dropout(torch.ones(4, 100_000)) != 0
    torch.manual_seed(3)
    again = dropout(torch.ones(4, 100_000)) != 0
    assert torch.equal(first, again)
    # Neighbours share one 64-bit draw; their masks must still be independent.
    pairs = first.view(-1, 4).float()
    both = (pairs[:, :, None] * pairs[:, None, :]).mean(0)
    expected = torch.full((4, 4), 0.25) + torch.eye(4) * 0.25
    torch.testing.assert_close(both, expected, rtol=0, atol=0.01)
    assert not torch.equal(first, dropout(torch.ones(4, 100_000)) != 0)


def test_attention_dropout_defaults_to_dropout_and_can_be_set_apart():
    assert GPTConfig(dropout=0.2).attention_dropout == 0.2  # nanoGPT's one knob
    config = GPTConfig(dropout=0.2, attn_dropout=0.0)
    assert config.attention_dropout == 0.0
    model = GPTLM(config)
    assert model.blocks[0].attn.attn_dropout.p == 0.0
    assert model.blocks[0].attn.resid_dropout.p == 0.2


def test_dropout_is_identity_in_eval_mode_and_at_p_zero():
    x = torch.randn(3, 5)
    assert Dropout(0.3).eval()(x) is x
    assert Dropout(0.0).train()(x) is x


def test_training_with_dropout_stays_causal():
    model = tiny_model(dropout=0.3).train()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 50
    torch.manual_seed(5)
    before = model(idx)
    torch.manual_seed(5)  # the same dropout masks
    after = model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=0)
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_dropout_keeps_the_mean_exact_in_bfloat16():
    # Under bf16-mixed the activations are bf16; a mask built in bf16 would round the scale
    # 1 / 0.9 to 1.109375 and shrink every kept value's expectation by 0.16%.
    x = torch.randn(8_000_000, generator=torch.Generator().manual_seed(0)).bfloat16()
    torch.manual_seed(0)
    y = Dropout(0.1).train()(x)
    assert y.dtype == torch.bfloat16
    # E[y] = x, so sum(y x) / sum(x x) is 1 up to sampling noise (sd 2e-4 here).
    ratio = (y.double() * x.double()).sum() / (x.double() ** 2).sum()
    assert ratio.item() == pytest.approx(1.0, abs=1e-3)
