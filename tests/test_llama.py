"""The `llama` family: grouped-query attention, rotary positions, SwiGLU, RMSNorm, no biases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.decoding import generate
from lmlab.models.llama import LlamaConfig, LlamaLM, rope_tables, rotate


def tiny(**changes) -> LlamaLM:
    torch.manual_seed(0)
    values = dict(vocab_size=40, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    return LlamaLM(LlamaConfig(**{**values, **changes})).eval()


def test_grouped_query_attention_equals_repeating_the_key_value_heads() -> None:
    model = tiny()
    attention = model.blocks[0].attn
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_tables(8, torch.arange(7), 10_000.0)
    with torch.no_grad():
        got = attention(x, cos, sin, None, None)
        q = rotate(attention.q(x).view(2, 7, 4, 8).transpose(1, 2), cos, sin)
        k = rotate(attention.k(x).view(2, 7, 2, 8).transpose(1, 2), cos, sin)
        v = attention.v(x).view(2, 7, 2, 8).transpose(1, 2)
        # query heads 0 and 1 share key/value head 0, heads 2 and 3 share head 1
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        expected = attention.proj(y.transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_rotary_scores_depend_only_on_the_distance_between_positions() -> None:
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i: int, j: int) -> float:
        cos, sin = rope_tables(8, torch.tensor([i, j]), 10_000.0)
        return float((rotate(q, cos[:1], sin[:1]) * rotate(k, cos[1:], sin[1:])).sum())

    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


def test_no_biases_and_an_untied_head_when_asked() -> None:
    model = tiny(tie_embeddings=False)
    assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]
    assert model.lm_head.weight is not model.token_embedding.weight
    tied = tiny()
    assert tied.lm_head.weight is tied.token_embedding.weight
    assert tied.config.hidden == 96  # 8/3 x 32, rounded up to 32


def test_decoding_can_read_past_the_training_window() -> None:
    model = tiny()
    prompt = torch.randint(0, 40, (1, 10), generator=torch.Generator().manual_seed(2))
    # a cache of 64 positions: 10 + 40 tokens without a shift, beyond block_size 16
    wide = generate(model, prompt, 40, temperature=0.0, context=64)
    full = generate(model, prompt, 40, temperature=0.0, use_cache=False)  # no limit to read
    assert torch.equal(wide, full)


def test_decoding_reads_the_weights_as_they_are_at_each_call() -> None:
    # The step's fused copies are made once per KV cache: a decoding call after the weights
    # change must see the new weights, not copies left from the call before.
    model = tiny()
    prompt = torch.randint(0, 40, (2, 3), generator=torch.Generator().manual_seed(6))
    before = generate(model, prompt, 10, temperature=0)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(-1.5)
    after = generate(model, prompt, 10, temperature=0)
    assert not torch.equal(before, after)
    assert torch.equal(after, generate(model, prompt, 10, temperature=0, use_cache=False))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(n_kv_head=3), r"model.n_kv_head \(3\) must divide model.n_head \(4\)"),
        (dict(n_head=3), r"model.n_embd \(32\) must be divisible by model.n_head \(3\)"),
        (dict(n_kv_head=0), r"model.n_kv_head must be a positive integer, got 0"),
        (dict(n_embd=12, n_head=4), r"must be even for rotary embeddings"),
        (dict(family="gpt"), r"model.family is 'gpt' but this is the llama config"),
    ],
)
def test_bad_shapes_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**changes)
