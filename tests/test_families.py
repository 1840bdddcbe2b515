"""What every model family promises through the one interface (lmlab.models.interface).

Each test runs on the tiny preset of every family: `tiny` (gpt), `llama_tiny`, `lstm_tiny`.
Family-specific behaviour is in test_gpt.py, test_llama.py and test_lstm.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from lmlab.checkpoint import checkpoint_metadata, export, load_model
from lmlab.decoding import beam_search, generate
from lmlab.lit_module import LanguageModel
from lmlab.models import build_model, config_from_dict, preset
from lmlab.parameters import parameter_counts
from lmlab.streams import StreamWindows
from lmlab.tokenizers import Tokenizer
from lmlab.vocab import Vocabulary

TINY = ["tiny", "llama_tiny", "lstm_tiny"]
VOCAB = 50
CONF = Path(__file__).resolve().parents[1] / "conf"
WORDS = ["<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 2)]


def tiny(name: str, seed: int = 0, **changes) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = preset(name, vocab_size=VOCAB, block_size=16)
    for key, value in changes.items():
        setattr(config, key, value)
    return build_model(config).eval()


def tokens(shape: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TINY)
def test_changing_token_t_leaves_earlier_logits_unchanged(name: str) -> None:
    model = tiny(name)
    idx = tokens((2, 16))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(idx), model(changed)
    assert torch.equal(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


@pytest.mark.parametrize("name", TINY)
def test_reading_with_a_state_in_pieces_equals_one_forward(name: str) -> None:
    model = tiny(name)
    idx = tokens((3, 14))
    with torch.no_grad():
        whole = model(idx)
        state = model.new_state(3)
        pieces = [model(idx[:, :5], state=state)]
        pieces += [model(idx[:, i : i + 1], state=state) for i in range(5, 9)]
        pieces.append(model(idx[:, 9:], state=state))
    assert state.length == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_the_fused_loss_equals_cross_entropy_of_the_logits(name: str) -> None:
    model = tiny(name)
    idx, targets = tokens((2, 12)), tokens((2, 12), seed=2)
    targets[0, :3] = -100
    with torch.no_grad():
        logits = model(idx)
        expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        nll, count = model(idx, targets=targets, reduction="sum")
    assert int(count) == 21
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_forward_is_the_output_layer_on_the_final_hidden_states(name: str) -> None:
    # what the neural cache reads: the states the output layer turns into logits and loss
    model = tiny(name)
    idx, targets = tokens((2, 12)), tokens((2, 12), seed=2)
    with torch.no_grad():
        hidden = model.hidden_states(idx)
        assert hidden.shape[:2] == (2, 12) and hidden.shape[2] == model.lm_head.in_features
        assert torch.equal(model.output(hidden), model(idx))
        assert torch.equal(model.output(hidden, targets), model(idx, targets=targets))
        total, count = model.output(hidden, targets, reduction="sum")
        assert (total, count) == model(idx, targets=targets, reduction="sum")
        state = model.new_state(2)
        model.hidden_states(idx[:, :5], state=state)  # a state advances as in forward
        assert state.length == 5


@pytest.mark.parametrize("name", TINY)
def test_a_tiny_model_overfits_one_batch_through_the_training_step(name: str) -> None:
    torch.manual_seed(0)
    module = LanguageModel(
        preset(name, vocab_size=VOCAB, block_size=16),
        WORDS,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    losses = _train_on_one_batch(module)
    assert losses[0] > 3.5  # about log(50) at initialisation
    assert losses[-1] < 0.2


def test_adafactor_as_configured_overfits_one_batch() -> None:
    # conf/optimizer/adafactor.yaml as a run instantiates it, over lmlab's two parameter
    # groups (weight decay on matrices only)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["optimizer=adafactor", "paths.output_dir=unused"])
    torch.manual_seed(0)
    module = LanguageModel(
        preset("tiny", vocab_size=VOCAB, block_size=16), WORDS, instantiate(cfg.optimizer)
    )
    losses = _train_on_one_batch(module)
    assert losses[0] > 3.5
    assert losses[-1] < 0.2


def _train_on_one_batch(module: LanguageModel, steps: int = 150) -> list[float]:
    """The training loss of each of `steps` steps on one fixed batch."""
    batch = (tokens((4, 16)), tokens((4, 16), seed=2))
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch] * steps, batch_size=None))
    return losses


@pytest.mark.parametrize("name", TINY)
def test_decoding_with_the_state_equals_recomputing_without_it(name: str) -> None:
    model = tiny(name, seed=3)
    prompt = tokens((3, 4), seed=4)
    # 4 + 12 tokens stay within the window, where the two paths agree exactly
    cached = generate(model, prompt, 12, temperature=0.0, use_cache=True)
    recomputed = generate(model, prompt, 12, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)
    beams, scores = beam_search(model, prompt, 12, num_beams=3, use_cache=True)
    beams_again, scores_again = beam_search(model, prompt, 12, num_beams=3, use_cache=False)
    assert torch.equal(beams, beams_again)
    torch.testing.assert_close(scores, scores_again, rtol=1e-5, atol=1e-5)
    sampled = [
        generate(model, prompt, 12, temperature=0.9, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(*sampled)  # the same seed, the same text


@pytest.mark.parametrize("name", TINY)
def test_a_checkpoint_and_an_export_rebuild_the_same_model(name: str, tmp_path) -> None:
    model = tiny(name, seed=5)
    metadata = checkpoint_metadata(model.config, WORDS)
    assert metadata["model_config"]["family"] == model.config.family
    assert config_from_dict(metadata["model_config"]) == model.config
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"lmlab": metadata, "state_dict": state}, tmp_path / "m.ckpt")
    idx = tokens((2, 8))
    for source in (
        tmp_path / "m.ckpt",
        export(model, Tokenizer(Vocabulary(WORDS)), tmp_path / "exported"),
    ):
        loaded, vocab = load_model(source)
        assert type(loaded) is type(model) and vocab.words == WORDS
        with torch.no_grad():
            assert torch.equal(loaded(idx), model(idx))


@pytest.mark.parametrize("name", TINY)
def test_parameters_are_counted_once_by_part(name: str) -> None:
    model = tiny(name)
    counts = parameter_counts(model)
    assert sum(counts.values()) == sum({id(p): p.numel() for p in model.parameters()}.values())
    # only an LSTM's output layer has a bias of its own (Zaremba's and AWD-LSTM's softmax)
    bias = model.lm_head.bias.numel() if model.lm_head.bias is not None else 0
    assert counts["embeddings"] > 0 and counts["other"] == bias
    core = counts["attention"] + counts["mlp"] if name != "lstm_tiny" else counts["recurrent"]
    assert core > 0


def test_checkpoints_without_a_family_are_gpt() -> None:
    old = {"vocab_size": 50, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}
    assert config_from_dict(old).family == "gpt"
    with pytest.raises(ValueError, match="unknown model family 'rnn'; lmlab has gpt, llama, lstm"):
        config_from_dict({**old, "family": "rnn"})


# -- the contiguous data order ---------------------------------------------------


def test_two_windows_with_a_carried_state_equal_one_window_of_twice_the_length() -> None:
    stream = tokens((1, 403))[0]
    short = StreamWindows(stream, streams=4, seq_len=10, pad_last=False)
    long = StreamWindows(stream, streams=4, seq_len=20, pad_last=False)
    (x1, y1), (x2, y2) = short[2], short[3]
    x, y = long[1]
    assert torch.equal(torch.cat([x1, x2], 1), x) and torch.equal(torch.cat([y1, y2], 1), y)
    model = tiny("lstm_tiny")
    with torch.no_grad():
        state = model.new_state(4)
        carried = torch.cat([model(x1, state=state), model(x2, state=state)], dim=1)
        torch.testing.assert_close(carried, model(x), rtol=1e-5, atol=1e-6)


def test_streams_cover_the_split_once_and_two_processes_read_what_one_does() -> None:
    split = torch.arange(2, 2 + 999)
    # evaluation: every token a target exactly once, the end padded
    windows = StreamWindows(split, streams=4, seq_len=16, pad_last=True)
    targets = torch.cat([windows[i][1] for i in range(len(windows))], dim=1)
    assert sorted(targets[targets != -100].tolist()) == split.tolist()
    # each row reads its stream in order: the input is the previous token
    inputs, targets = windows[0]
    assert torch.equal(inputs[:, 1:], targets[:, :-1]) and inputs[0, 0] == 0  # <eos> first
    one = StreamWindows(split, streams=8, seq_len=16, pad_last=False)
    two = [StreamWindows(split, 4, 16, False, rank=r, world_size=2) for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1])
    for i in range(len(one)):
        assert torch.equal(one[i][0], torch.cat([two[0][i][0], two[1][i][0]]))


def test_validation_carries_the_state_across_the_whole_split() -> None:
    torch.manual_seed(0)
    config = preset("lstm_tiny", vocab_size=VOCAB, block_size=8)
    split = tokens((1, 500))[0]

    def val_ppl(seq_len: int, carry: bool) -> float:
        module = LanguageModel(config, WORDS, optimizer=torch.optim.SGD, carry_state=carry)
        module.model.load_state_dict(reference.state_dict())
        windows = StreamWindows(split, streams=3, seq_len=seq_len, pad_last=True)
        module.eval()
        with torch.no_grad():
            module.on_validation_epoch_start()
            for i in range(len(windows)):
                module.validation_step(windows[i], i)
        return float(module.val_ppl.compute())

    reference = build_model(config).eval()
    carried_short, carried_long = val_ppl(4, True), val_ppl(64, True)
    assert carried_short == pytest.approx(carried_long, rel=1e-6)  # the state carries it all
    # without carrying, each window starts from a zero state: a different (worse) figure
    windows = StreamWindows(split, streams=3, seq_len=4, pad_last=True)
    nll = count = 0
    with torch.no_grad():
        for i in range(len(windows)):
            total, n = reference(*windows[i][:1], targets=windows[i][1], reduction="sum")
            nll, count = nll + float(total), count + int(n)
    assert val_ppl(4, False) == pytest.approx(math.exp(nll / count), rel=1e-6)
    assert val_ppl(4, False) != pytest.approx(carried_short, rel=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_a_mixed_length_batch_decodes_each_prompt_as_it_would_alone(name: str) -> None:
    model = tiny(name, seed=6)
    prompts = [tokens((1, n), seed=n)[0] for n in (2, 7, 4, 5)]
    longest = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), longest, dtype=torch.long)
    pad = torch.ones(len(prompts), longest, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        batch[row, longest - len(prompt) :], pad[row, longest - len(prompt) :] = prompt, False
    together = generate(model, batch, 8, temperature=0.0, pad_mask=pad)
    beams, scores = beam_search(model, batch, 6, num_beams=3, pad_mask=pad)
    with torch.no_grad():  # the logits of each row's last prompt token, batched and alone
        batched = model(batch, pad_mask=pad)[:, -1]
    for row, prompt in enumerate(prompts):
        alone = generate(model, prompt[None], 8, temperature=0.0)
        assert torch.equal(together[row, longest:], alone[0, len(prompt) :])
        alone_beams, alone_score = beam_search(model, prompt[None], 6, num_beams=3)
        assert torch.equal(beams[row, longest:], alone_beams[0, len(prompt) :])
        torch.testing.assert_close(scores[row], alone_score[0], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(
                batched[row], model(prompt[None])[0, -1], rtol=1e-5, atol=1e-5
            )


TRANSFORMERS = ["tiny", "llama_tiny"]  # the families whose state is a KV cache


def static_cache(model: torch.nn.Module, batch_size: int, max_len: int | None = None):
    cache = model.new_state(batch_size, max_len=max_len)
    cache.static = True  # what an accelerator gets by default; the CPU keeps the sliced view
    return cache


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_a_static_kv_cache_gives_the_logits_of_recomputing_at_every_step(name: str) -> None:
    model = tiny(name, seed=7)
    idx = tokens((3, 14), seed=9)
    rows = torch.tensor([2, 2, 0])  # beams: row 2 survives twice, row 1 dies
    with torch.no_grad():
        cache = static_cache(model, 3)
        keys = cache.keys.data_ptr()
        steps = [model(idx[:, :5], state=cache)[:, -1]]
        for i in range(5, 8):
            steps.append(model(idx[:, i : i + 1], state=cache)[:, -1])
        expected = [model(idx[:, : i + 1])[:, -1] for i in range(4, 8)]
        cache.reorder(rows)
        history = torch.cat([idx[rows, :8], idx[:, 8:]], dim=1)
        for i in range(8, 14):
            steps.append(model(history[:, i : i + 1], state=cache)[:, -1])
            expected.append(model(history[:, : i + 1])[:, -1])
    assert cache.keys.data_ptr() == keys  # the same buffers throughout, as a graph needs
    for got, want in zip(steps, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_a_static_kv_cache_reads_left_padded_rows_as_each_prompt_alone(name: str) -> None:
    model = tiny(name, seed=8)
    prompts = [tokens((1, n), seed=n)[0] for n in (3, 6)]
    batch = torch.zeros(2, 6, dtype=torch.long)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    batch[0, 3:], pad[0, :3], batch[1] = prompts[0], True, prompts[1]
    more = tokens((2, 4), seed=10)
    with torch.no_grad():
        cache = static_cache(model, 2)
        model(batch, state=cache, pad_mask=pad)
        steps = torch.cat([model(more[:, i : i + 1], state=cache) for i in range(4)], dim=1)
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, more[row]])[None])[0, -4:]
            torch.testing.assert_close(steps[row], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_a_static_kv_cache_shifts_its_window_and_overflows_as_the_sliced_one(name: str) -> None:
    # What decoding does past the cache's size (lmlab.decoding): empty it, prefill the newest
    # half, go on; both caches must agree at every step, and both refuse to overflow.
    model = tiny(name, seed=9)
    idx = tokens((2, 24), seed=11)
    logits = {}
    with torch.no_grad():
        for static in (False, True):
            cache = model.new_state(2, max_len=12)
            cache.static = static
            out = [model(idx[:, :12], state=cache)[:, -1]]
            with pytest.raises(ValueError, match="KV cache overflow: 13 positions > 12"):
                model(idx[:, 12:13], state=cache)
            cache.reset()
            out.append(model(idx[:, 6:13], state=cache)[:, -1])
            out += [model(idx[:, i : i + 1], state=cache)[:, -1] for i in range(13, 18)]
            logits[static] = torch.stack(out)
            torch.testing.assert_close(logits[static][-1], model(idx[:, 6:18])[:, -1])
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", TRANSFORMERS)
def test_the_one_token_step_equals_the_module_path(name: str, static: bool, padded: bool) -> None:
    # In eval mode a one-token step with a cache runs functional ops on the step's copies of
    # the matrices (gpt: transposed; llama: fused and transposed, the rotation from a table);
    # train mode with dropout 0 takes the module path: the two agree to float32 rounding.
    model = tiny(name, dropout=0.0)
    idx = tokens((3, 12), seed=5)
    pad_mask = None
    if padded:  # rows of 4, 2 and 0 leading padding slots
        pad_mask = torch.arange(5)[None] < torch.tensor([[4], [2], [0]])
        idx[:, :5] = idx[:, :5].masked_fill(pad_mask, 0)
    steps = {}
    with torch.no_grad():
        for training in (True, False):
            model.train(training)
            cache = static_cache(model, 3, max_len=12) if static else model.new_state(3, 12)
            model(idx[:, :5], state=cache, pad_mask=pad_mask)
            steps[training] = torch.cat(
                [model(idx[:, i : i + 1], state=cache) for i in range(5, 12)], 1
            )
            assert cache.length == 12
            with pytest.raises(ValueError, match="KV cache overflow: 13 positions > 12"):
                model(idx[:, :1], state=cache)
    torch.testing.assert_close(steps[False], steps[True], rtol=1e-5, atol=1e-5)
