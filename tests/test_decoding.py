import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmlab.decoding import (
    apply_temperature,
    beam_search,
    check_decoding_args,
    generate,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from lmlab.models.gpt import GPTLM, GPTConfig
from lmlab.models.kv_cache import KVCache

NEG_INF = float("-inf")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def probs_logits(*probs: float) -> Tensor:
    """Logits (1, V) whose softmax is `probs`."""
    return torch.tensor([probs]).log()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These tensors are tiny: a second thread only adds hand-offs, and on a busy machine it
    # makes each op wait for a core (3 s becomes 15 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model() -> GPTLM:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return GPTLM(config)


class Recorder(nn.Module):
    """Wraps a model and keeps the last-position logits of every forward call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.max_context = model.max_context
        self.new_state = model.new_state
        self.logits: list[Tensor] = []
        self.inputs: list[Tensor] = []

    def forward(self, idx: Tensor, state: KVCache | None = None, pad_mask=None) -> Tensor:
        logits = self.model(idx, state=state, pad_mask=pad_mask)
        self.inputs.append(idx.clone())
        self.logits.append(logits[:, -1].clone())
        return logits


class TableLM(nn.Module):
    """Next-token log-probabilities looked up from the last token: a bigram model.

    The models' interface (`lmlab.models.interface`), its state a KV cache it only advances.
    """

    max_context = 16

    def __init__(self, probs: list[list[float]]) -> None:
        super().__init__()
        vocab = len(probs)
        self.config = GPTConfig(vocab_size=vocab, block_size=16, n_layer=1, n_head=1, n_embd=4)
        self.register_buffer("table", torch.tensor(probs).log())

    def new_state(self, batch_size, max_len=None, device=None, dtype=None) -> KVCache:
        return KVCache(1, batch_size, 1, 1, max_len or 16, device=device)

    def forward(self, idx: Tensor, state: KVCache | None = None, pad_mask=None) -> Tensor:
        if state is not None:
            state.advance(idx.size(1))
        return self.table[idx]  # (B, T, V)


# Greedy is myopic here: from the start token 0 it takes 1 (0.6), after which no token is
# likely (0.3 at best); taking 2 (0.38) leads to 3 with 0.95, so 0.361 beats 0.18.
MYOPIC = [
    [0.01, 0.6, 0.38, 0.01],
    [0.2, 0.3, 0.25, 0.25],
    [0.02, 0.02, 0.01, 0.95],
    [0.25, 0.25, 0.25, 0.25],
]

# 0 -> 1 -> 3 (eos) -> 0 -> ..., each with certainty.
CHAIN = [
    [0.01, 0.97, 0.01, 0.01],
    [0.01, 0.01, 0.01, 0.97],
    [0.01, 0.01, 0.97, 0.01],
    [0.97, 0.01, 0.01, 0.01],
]


# ---------------------------------------------------------------- filters on fixed logits


def test_temperature_scales_the_distribution():
    logits = torch.tensor([[0.0, math.log(4.0)]])  # probs 1/5, 4/5
    torch.testing.assert_close(
        F.softmax(apply_temperature(logits, 2.0), dim=-1), torch.tensor([[1 / 3, 2 / 3]])
    )
    torch.testing.assert_close(
        F.softmax(apply_temperature(logits, 0.5), dim=-1), torch.tensor([[1 / 17, 16 / 17]])
    )
    torch.testing.assert_close(apply_temperature(logits, 1.0), logits)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, -1.0, 5.0, 4.0]])
    expected = torch.tensor([[NEG_INF, 3.0, 2.0, NEG_INF], [NEG_INF, NEG_INF, 5.0, 4.0]])
    assert torch.equal(top_k_filter(logits, 2), expected)
    assert torch.equal(top_k_filter(logits, 4), logits)
    assert torch.equal(top_k_filter(logits, 100), logits)  # clipped, no torch error


def test_top_k_1_sampling_equals_greedy():
    logits = torch.randn(16, 30, generator=seeded(0))
    greedy = sample_next(logits, temperature=0)
    assert torch.equal(greedy, logits.argmax(-1))
    for seed in range(5):
        sampled = sample_next(logits, temperature=1.5, top_k=1, generator=seeded(seed))
        assert torch.equal(sampled, greedy)


@pytest.mark.parametrize(
    ("p", "kept"), [(0.3, 1), (0.5, 1), (0.51, 2), (0.8, 2), (0.81, 3), (0.95, 3), (0.96, 4)]
)
def test_top_p_keeps_the_smallest_set_reaching_p(p: float, kept: int):
    logits = probs_logits(0.5, 0.3, 0.15, 0.05)
    # Shuffle the vocabulary so the filter cannot rely on sorted input.
    perm = torch.tensor([2, 0, 3, 1])
    filtered = top_p_filter(logits[:, perm], p)
    assert torch.equal(filtered.isfinite(), (perm < kept)[None])
    finite = filtered.isfinite()
    assert torch.equal(filtered[finite], logits[:, perm][finite])


def test_top_p_always_keeps_the_most_likely_token_and_works_per_row():
    logits = torch.cat([probs_logits(0.1, 0.9, 0.0), probs_logits(0.4, 0.3, 0.3)])
    filtered = top_p_filter(logits, 1e-9)
    assert torch.equal(
        filtered.isfinite(), torch.tensor([[False, True, False], [True, False, False]])
    )
    filtered = top_p_filter(logits, 0.6)
    assert filtered.isfinite().sum(-1).tolist() == [1, 2]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_sample_next_order_is_top_k_then_temperature_then_top_p():
    # Top-k=2 leaves probs 0.5/0.3 -> renormalised 0.625/0.375; temperature 0.5 squares them
    # -> 0.735/0.265, so top-p 0.7 keeps only the first. Top-p before temperature would keep two.
    logits = probs_logits(0.5, 0.3, 0.15, 0.05).expand(200, 4)
    tokens = sample_next(logits, temperature=0.5, top_k=2, top_p=0.7, generator=seeded(0))
    assert tokens.eq(0).all()
    tokens = sample_next(logits, temperature=1.0, top_k=2, top_p=0.7, generator=seeded(0))
    assert set(tokens.tolist()) == {0, 1}


def test_sampling_with_top_k_draws_from_the_renormalised_kept_tokens():
    # sample_next samples among the k kept tokens: the frequencies must be those of
    # softmax(top_k_filter(logits)), with the vocabulary shuffled so order cannot help.
    logits = probs_logits(0.05, 0.4, 0.1, 0.25, 0.2).expand(40_000, 5)
    tokens = sample_next(logits, top_k=3, generator=seeded(0))
    frequencies = torch.bincount(tokens, minlength=5) / tokens.numel()
    expected = F.softmax(top_k_filter(logits[:1], 3), dim=-1)[0]
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.01)
    assert frequencies[0] == frequencies[2] == 0
    # With top-p after top-k: 0.4 / 0.85 < 0.6 <= 0.65 / 0.85 keeps tokens 1 and 3 only.
    tokens = sample_next(logits, top_k=3, top_p=0.6, generator=seeded(1))
    frequencies = torch.bincount(tokens, minlength=5) / tokens.numel()
    torch.testing.assert_close(
        frequencies, torch.tensor([0, 0.4 / 0.65, 0, 0.25 / 0.65, 0]), rtol=0, atol=0.01
    )


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = torch.zeros(64, 100)  # uniform: 64 draws from 100 tokens
    first = sample_next(logits, generator=seeded(1))
    assert torch.equal(first, sample_next(logits, generator=seeded(1)))
    assert not torch.equal(first, sample_next(logits, generator=seeded(2)))


def test_generate_is_reproducible_with_a_seeded_generator(tiny_model):
    prompt = torch.randint(0, 50, (2, 4), generator=seeded(0))
    kwargs = dict(temperature=1.0, top_k=20, top_p=0.9)
    first = generate(tiny_model, prompt, 12, generator=seeded(7), **kwargs)
    assert torch.equal(first, generate(tiny_model, prompt, 12, generator=seeded(7), **kwargs))
    assert not torch.equal(first, generate(tiny_model, prompt, 12, generator=seeded(8), **kwargs))
    assert torch.equal(first[:, :4], prompt)


# ---------------------------------------------------------------- KV cache vs recomputation


@pytest.mark.parametrize("batch_size", [1, 3])
def test_cache_matches_recomputing_the_prefix(tiny_model, batch_size: int):
    prompt = torch.randint(0, 50, (batch_size, 5), generator=seeded(batch_size))
    new = tiny_model.config.block_size - 5  # the last token is predicted from 31 positions
    cached, recomputed = Recorder(tiny_model), Recorder(tiny_model)
    with_cache = generate(cached, prompt, new, temperature=0, use_cache=True)
    without = generate(recomputed, prompt, new, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)
    assert with_cache.shape == (batch_size, tiny_model.config.block_size)
    # One forward per new token; with the cache each feeds one position after the prefill.
    assert len(cached.logits) == len(recomputed.logits) == new
    assert [x.size(1) for x in cached.inputs] == [5] + [1] * (new - 1)
    torch.testing.assert_close(
        torch.stack(cached.logits), torch.stack(recomputed.logits), rtol=0, atol=1e-5
    )


def window_start(prompt_len: int, new: int, block_size: int) -> list[int]:
    """Where the cached context starts when predicting token n, for n = T .. T + new - 1."""
    start, starts = max(0, prompt_len - block_size), []
    for n in range(prompt_len, prompt_len + new):
        if n - start > block_size:
            start = n - block_size // 2
        starts.append(start)
    return starts


@pytest.mark.parametrize("prompt_len", [5, 40])
def test_window_shift_at_block_size(tiny_model, prompt_len: int):
    block_size = tiny_model.config.block_size
    prompt = torch.randint(0, 50, (2, prompt_len), generator=seeded(prompt_len))
    new = 70  # several shifts
    cached = Recorder(tiny_model)
    out = generate(cached, prompt, new, temperature=0, use_cache=True)
    uncached = generate(tiny_model, prompt, new, temperature=0, use_cache=False)
    assert out.shape == uncached.shape == (2, prompt_len + new)
    # Identical until the first shift, when the two paths' contexts part.
    first_shift = max(block_size, prompt_len) + 1
    assert torch.equal(out[:, :first_shift], uncached[:, :first_shift])
    # After each shift the cache holds exactly the newest tokens: every step's logits are
    # those of recomputing its window from scratch.
    starts = window_start(prompt_len, new, block_size)
    with torch.no_grad():
        for step, start in enumerate(starts):
            window = out[:, start : prompt_len + step]
            assert window.size(1) <= block_size
            expected = tiny_model(window)[:, -1]
            torch.testing.assert_close(cached.logits[step], expected, rtol=0, atol=1e-5)
    # Each shift re-prefills half a block, not one position per step.
    assert max(x.size(1) for x in cached.inputs[1:]) == block_size // 2


def test_generate_restores_training_mode(tiny_model):
    tiny_model.train()
    generate(tiny_model, torch.zeros(1, 1, dtype=torch.long), 2)
    assert tiny_model.training
    tiny_model.eval()


# ---------------------------------------------------------------- eos


def test_rows_that_emit_eos_keep_emitting_it_and_the_loop_ends_early():
    model = TableLM(CHAIN)
    prompt = torch.tensor([[0], [1]])
    out = generate(model, prompt, 10, temperature=0, eos_id=3, stop_at_eos=True)
    assert out.tolist() == [[0, 1, 3], [1, 3, 3]]
    out = generate(model, prompt, 4, temperature=0, eos_id=3)  # eos is just a token
    assert out.tolist() == [[0, 1, 3, 0, 1], [1, 3, 0, 1, 3]]


# ---------------------------------------------------------------- beam search


def test_beam_search_with_one_beam_equals_greedy(tiny_model):
    prompt = torch.randint(0, 50, (3, 4), generator=seeded(3))
    greedy = generate(tiny_model, prompt, 40, temperature=0)
    beams, _ = beam_search(tiny_model, prompt, 40, num_beams=1)
    assert torch.equal(beams, greedy)
    uncached, _ = beam_search(tiny_model, prompt, 40, num_beams=1, use_cache=False)
    assert torch.equal(uncached[:, :33], greedy[:, :33])  # paths part at the first shift
    # Within one block the score is the greedy sequence's mean log-probability.
    _, scores = beam_search(tiny_model, prompt, 28, num_beams=1)
    with torch.no_grad():
        logprobs = F.log_softmax(tiny_model(greedy[:, :32]), dim=-1)[:, 3:-1]
    total = logprobs.gather(-1, greedy[:, 4:32, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(scores, total / 28)


@pytest.mark.parametrize("stop_at_eos", [False, True])
def test_beam_search_with_cache_equals_recomputing(tiny_model, stop_at_eos: bool):
    # Each step the cache copies only the positions after the first one where a beam and the
    # beam it continues differ; recomputing every prefix is the reference.
    prompt = torch.randint(0, 50, (2, 5), generator=seeded(11))
    kwargs = dict(num_beams=4, eos_id=0, stop_at_eos=stop_at_eos)
    cached, cached_scores = beam_search(tiny_model, prompt, 27, use_cache=True, **kwargs)
    recomputed, scores = beam_search(tiny_model, prompt, 27, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)
    torch.testing.assert_close(cached_scores, scores, rtol=0, atol=1e-5)


def test_beam_search_with_one_beam_equals_greedy_with_eos():
    model = TableLM(CHAIN)
    prompt = torch.tensor([[0], [1], [2]])
    greedy = generate(model, prompt, 6, temperature=0, eos_id=3, stop_at_eos=True)
    beams, _ = beam_search(model, prompt, 6, num_beams=1, eos_id=3, stop_at_eos=True)
    assert torch.equal(beams, greedy)


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_beats_myopic_greedy(use_cache: bool):
    model = TableLM(MYOPIC)
    prompt = torch.tensor([[0]])
    greedy = generate(model, prompt, 2, temperature=0)
    assert greedy.tolist() == [[0, 1, 1]]  # 0.6 * 0.3 = 0.18
    beams, scores = beam_search(model, prompt, 2, num_beams=2, use_cache=use_cache)
    assert beams.tolist() == [[0, 2, 3]]  # 0.38 * 0.95 = 0.361
    torch.testing.assert_close(scores, torch.tensor([math.log(0.38 * 0.95) / 2]))
    beams, _ = beam_search(model, prompt, 2, num_beams=1, use_cache=use_cache)
    assert torch.equal(beams, greedy)


def test_beam_search_length_penalty_and_padding():
    # From 0: eos (3) at 0.5 now, or 1 (0.45) then eos (0.9) next: sums log 0.5 vs log 0.405.
    probs = [
        [0.02, 0.45, 0.03, 0.5],
        [0.05, 0.03, 0.02, 0.9],
        [0.25, 0.25, 0.25, 0.25],
        [0.25, 0.25, 0.25, 0.25],
    ]
    model, prompt = TableLM(probs), torch.tensor([[0], [2]])
    kwargs = dict(num_beams=2, eos_id=3, stop_at_eos=True)
    short, _ = beam_search(model, prompt, 5, length_penalty=0.0, **kwargs)
    assert short[0].tolist()[:2] == [0, 3]  # the sum alone prefers stopping at once
    long, scores = beam_search(model, prompt, 5, length_penalty=1.0, **kwargs)
    assert long[0].tolist()[:3] == [0, 1, 3]  # per-token average prefers the longer one
    torch.testing.assert_close(scores[0], torch.tensor(math.log(0.405) / 2))
    assert long.shape[0] == 2


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=-0.5), r"temperature must be a finite number >= 0, got -0\.5; use 0"),
        (dict(temperature=float("nan")), r"temperature must be a finite number >= 0, got nan"),
        (dict(temperature=float("inf")), r"temperature must be a finite number >= 0, got inf"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0\.0; use top_p=None"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1\.5"),
        (dict(top_k=0), r"top_k must be an integer >= 1, got 0; use top_k=None"),
        (dict(top_k=2.5), r"top_k must be an integer >= 1, got 2\.5"),
        (dict(num_beams=0), r"num_beams must be an integer >= 1, got 0; use 1"),
        (dict(max_new_tokens=-1), r"max_new_tokens must be an integer >= 0, got -1"),
        (dict(num_samples=0), r"num_samples must be an integer >= 1, got 0"),
        (dict(length_penalty=float("nan")), r"length_penalty must be a finite number"),
        (dict(stop_at_eos=True), r"stop_at_eos=True needs an eos_id"),
        (dict(eos_id=50, vocab_size=50), r"eos_id must be a token id >= 0 below the vocab"),
    ],
)
def test_bad_decoding_arguments_raise_value_error(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        check_decoding_args(**kwargs)


def test_entry_points_and_filters_check_their_arguments(tiny_model):
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"temperature must be"):
        generate(tiny_model, prompt, 3, temperature=-1)
    with pytest.raises(ValueError, match=r"max_new_tokens must be"):
        generate(tiny_model, prompt, -3)
    with pytest.raises(ValueError, match=r"num_beams must be"):
        beam_search(tiny_model, prompt, 3, num_beams=0)
    with pytest.raises(ValueError, match=r"prompt_ids must be an integer tensor of shape"):
        generate(tiny_model, torch.zeros(4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"prompt_ids must lie in \[0, 50\)"):
        generate(tiny_model, torch.full((1, 2), 50), 3)
    with pytest.raises(ValueError, match=r"top_p must be in"):
        top_p_filter(torch.zeros(1, 3), 0.0)
    with pytest.raises(ValueError, match=r"top_k must be"):
        top_k_filter(torch.zeros(1, 3), 0)
    with pytest.raises(ValueError, match=r"apply_temperature needs temperature > 0"):
        apply_temperature(torch.zeros(1, 3), 0.0)


def test_top_k_above_the_vocabulary_warns_once_and_is_clipped(tiny_model):
    with pytest.warns(UserWarning, match=r"top_k=500 exceeds the vocabulary size 4"):
        assert check_decoding_args(top_k=500, vocab_size=4) == 4
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(tiny_model, prompt, 5, top_k=500, generator=seeded(0))
    assert len(caught) == 1 and "top_k=500" in str(caught[0].message)
    assert torch.equal(out, generate(tiny_model, prompt, 5, generator=seeded(0)))


def test_zero_new_tokens_returns_the_prompt(tiny_model):
    prompt = torch.randint(0, 50, (2, 3), generator=seeded(0))
    assert torch.equal(generate(tiny_model, prompt, 0), prompt)
    sequences, scores = beam_search(tiny_model, prompt, 0, num_beams=3)
    assert torch.equal(sequences, prompt) and scores.tolist() == [0.0, 0.0]
