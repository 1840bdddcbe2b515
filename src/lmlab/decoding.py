"""Decoding: filters on logits, one sampling step, a generate loop and a beam search.

The filters are pure functions on logits of shape (B, vocab). `generate` and
`beam_search` drive a model of any family through the interface they share
(`lmlab.models.interface`): `forward(idx, state=...)` continues the sequence a
decoding state holds (the KV cache of a Transformer, the hidden and cell states
of an LSTM). The prompt is prefilled once, then each step feeds one position.

Contexts longer than the model can hold do not crash. A KV cache holds
`context` positions (default: the model's `max_context`, `gpt`'s `block_size`;
for a Llama, whose rotary positions have no table, its training window unless
`context=` asks for more); when it is full it drops its oldest half: the cache
is emptied and refilled with the newest `capacity // 2` tokens, which costs one
prefill every `capacity // 2` steps. Without the cache, each step reads the last
`context` tokens (all of them where nothing limits the model). The two paths
therefore agree exactly until the first shift and differ after it. An LSTM's
state holds any length: it never shifts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmlab.checks import is_int, is_real
from lmlab.models.interface import State

# float32 cumulative sums are off by ~1e-7, so a prefix whose mass is below p by
# less than this counts as reaching p: probs [0.5, 0.3, ...] with p=0.8 keep two.
_MASS_TOLERANCE = 1e-6


# ---------------------------------------------------------------------------
# Argument checks: one line saying what is wrong and how to fix it.


def _check_temperature(temperature: float) -> None:
    if not (is_real(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(
            f"temperature must be a finite number >= 0, got {temperature!r}; "
            "use 0 for greedy decoding or a positive value such as 0.8 to sample"
        )


def _check_top_k(top_k: int | None) -> None:
    if top_k is not None and not (is_int(top_k) and top_k >= 1):
        raise ValueError(
            f"top_k must be an integer >= 1, got {top_k!r}; "
            "use top_k=None to turn top-k filtering off, or a value such as 50"
        )


def _check_top_p(top_p: float | None) -> None:
    if top_p is not None and not (is_real(top_p) and 0 < top_p <= 1):
        raise ValueError(
            f"top_p must be in (0, 1], got {top_p!r}; "
            "use top_p=None (or 1.0) to turn nucleus sampling off, or a value such as 0.9"
        )


def check_decoding_args(
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 1,
    max_new_tokens: int = 0,
    num_samples: int = 1,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
    stop_at_eos: bool = False,
    vocab_size: int | None = None,
) -> int | None:
    """Raise `ValueError` for the first bad decoding argument; return the top_k to use.

    Entry points call this before loading anything, so a typo fails in
    milliseconds. A top_k above `vocab_size` is not an error: it warns and
    comes back clipped to `vocab_size`.
    """
    _check_temperature(temperature)
    _check_top_k(top_k)
    _check_top_p(top_p)
    if not (is_int(num_beams) and num_beams >= 1):
        raise ValueError(
            f"num_beams must be an integer >= 1, got {num_beams!r}; use 1 to decode without beams"
        )
    if not (is_int(max_new_tokens) and max_new_tokens >= 0):
        raise ValueError(
            f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}; "
            "pass how many tokens to generate after the prompt"
        )
    if not (is_int(num_samples) and num_samples >= 1):
        raise ValueError(
            f"num_samples must be an integer >= 1, got {num_samples!r}; "
            "pass how many continuations to generate per prompt"
        )
    if not (is_real(length_penalty) and math.isfinite(length_penalty)):
        raise ValueError(
            f"length_penalty must be a finite number, got {length_penalty!r}; "
            "use 1.0 to rank beams by average log-probability per token, 0 for their sum"
        )
    if eos_id is not None and not (
        is_int(eos_id) and eos_id >= 0 and (vocab_size is None or eos_id < vocab_size)
    ):
        bound = "" if vocab_size is None else f" below the vocabulary size {vocab_size}"
        raise ValueError(
            f"eos_id must be a token id >= 0{bound}, got {eos_id!r}; pass the vocabulary's <eos> id"
        )
    if stop_at_eos and eos_id is None:
        raise ValueError(
            "stop_at_eos=True needs an eos_id; pass the vocabulary's <eos> id or stop_at_eos=False"
        )
    if top_k is not None and vocab_size is not None and top_k > vocab_size:
        warnings.warn(
            f"top_k={top_k} exceeds the vocabulary size {vocab_size}; using top_k={vocab_size}, "
            "which filters nothing",
            stacklevel=2,
        )
        return vocab_size
    return top_k


# ---------------------------------------------------------------------------
# Pure functions on logits (B, vocab).


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Logits divided by `temperature` (> 0); temperature 0 (greedy) is `sample_next`'s job."""
    _check_temperature(temperature)
    if temperature == 0:
        raise ValueError(
            "apply_temperature needs temperature > 0; for greedy decoding call "
            "sample_next(logits, temperature=0)"
        )
    return logits if temperature == 1 else logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep exactly the `k` largest logits per row (ties broken by position), the rest -inf.

    A `k` above the vocabulary size keeps everything.
    """
    _check_top_k(k)
    k = min(k, logits.size(-1))
    if k == logits.size(-1):
        return logits
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches `p`.

    The most likely token is always kept, so no row is left empty.
    """
    _check_top_p(p)
    if p == 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = F.softmax(sorted_logits.float(), dim=-1)
    # A token is needed while the mass of the tokens ranked above it is still below p.
    mass_before = F.pad(probs.cumsum(dim=-1)[..., :-1], (1, 0))
    drop_sorted = mass_before >= p - _MASS_TOLERANCE
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B,) from logits (B, vocab).

    Applies top-k, then temperature, then top-p (litgpt's order, so top-p sees
    the tempered distribution), then draws with `torch.multinomial`.
    Temperature 0 is greedy: the argmax, and `generator` is not used. The
    generator must live on the logits' device.
    """
    _check_temperature(temperature)
    _check_top_k(top_k)
    if temperature == 0:  # top-k keeps the largest logit, so it cannot change the argmax
        return logits.argmax(dim=-1)
    candidates = None
    if top_k is not None and top_k < logits.size(-1):
        # Sampling among the k kept tokens is sampling from top_k_filter's logits (the rest
        # has probability 0), and top-p then sorts k values instead of the vocabulary.
        logits, candidates = logits.topk(top_k, dim=-1)
    logits = apply_temperature(logits, temperature)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = F.softmax(logits.float(), dim=-1)
    drawn = torch.multinomial(probs, num_samples=1, generator=generator)
    return (drawn if candidates is None else candidates.gather(-1, drawn)).squeeze(-1)


# ---------------------------------------------------------------------------
# Controls on the scores: pure functions of the logits (or, in beam search, the
# log-probabilities) and the sequence so far, with Hugging Face `generate`'s
# meaning. `real` (B, n) marks the sequence's real tokens (False at left
# padding), which alone count as "already in the sequence".


def repetition_penalty(scores: Tensor, tokens: Tensor, penalty: float, real: Tensor) -> Tensor:
    """Every token already in its row (prompt and continuation) made less likely (CTRL, HF).

    A positive score is divided by `penalty`, a negative one multiplied by it: penalty
    1 changes nothing, > 1 discourages repeats, < 1 encourages them.
    """
    if penalty == 1.0:
        return scores
    seen = torch.zeros_like(scores, dtype=torch.long).scatter_add_(1, tokens, real.long()) > 0
    penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalised, scores)


def banned_ngram_tokens(tokens: Tensor, n: int, vocab_size: int, real: Tensor) -> Tensor:
    """(B, vocab) True for each token that would repeat an n-gram already in its row (HF's
    `no_repeat_ngram_size`): the row's last n - 1 tokens followed by it occurred before."""
    banned = torch.zeros(tokens.size(0), vocab_size, dtype=torch.long, device=tokens.device)
    if n < 1 or tokens.size(1) < n:
        return banned.bool()
    grams = tokens.unfold(1, n, 1)  # (B, G, n): every n-gram of the row
    whole = real.unfold(1, n, 1).all(-1)  # (B, G): n-grams of real tokens only
    if n == 1:
        match = whole
    else:
        prefix = tokens[:, tokens.size(1) - n + 1 :]  # (B, n - 1): what the next token follows
        prefix_real = real[:, tokens.size(1) - n + 1 :].all(-1, keepdim=True)
        match = (grams[..., :-1] == prefix[:, None]).all(-1) & whole & prefix_real
    return banned.scatter_add_(1, grams[..., -1], match.long()) > 0


def suppress(scores: Tensor, token_ids: Tensor) -> Tensor:
    """`token_ids` (k,) made impossible (HF's `suppress_tokens`)."""
    if token_ids.numel() == 0:
        return scores
    return scores.index_fill(-1, token_ids, float("-inf"))


def hold_back_eos(scores: Tensor, eos_id: int, generated: int, min_new_tokens: int) -> Tensor:
    """`eos_id` made impossible until `min_new_tokens` tokens are generated (HF's meaning)."""
    if generated >= min_new_tokens:
        return scores
    return scores.index_fill(-1, torch.tensor([eos_id], device=scores.device), float("-inf"))


@dataclass(frozen=True)
class Controls:
    """The controls on the scores, applied in this order before top-k, temperature and top-p:
    repetition penalty, no-repeat n-grams, suppressed tokens, then `<eos>` held back until
    `min_new_tokens` (in beam search: on the log-probabilities, as Hugging Face does)."""

    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    suppress_tokens: tuple[int, ...] = ()
    min_new_tokens: int = 0

    def check(self, max_new_tokens: int, vocab_size: int | None = None) -> None:
        """Raise `ValueError` for the first bad value."""
        if not (is_real(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(
                f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}; "
                "1.0 changes nothing, 1.2 discourages repeating words"
            )
        if not (is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0):
            raise ValueError(
                f"no_repeat_ngram_size must be an integer >= 0, got "
                f"{self.no_repeat_ngram_size!r}; 0 turns it off, 3 forbids repeating a trigram"
            )
        if not (is_int(self.min_new_tokens) and self.min_new_tokens >= 0):
            raise ValueError(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if self.min_new_tokens > max_new_tokens:
            raise ValueError(
                f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={max_new_tokens}; "
                "raise max_new_tokens or lower min_new_tokens"
            )
        for token in self.suppress_tokens:
            if not (is_int(token) and token >= 0 and (vocab_size is None or token < vocab_size)):
                raise ValueError(f"suppress_tokens holds {token!r}, not a token id")

    @property
    def active(self) -> bool:
        return self != Controls()

    def apply(
        self, scores: Tensor, tokens: Tensor, real: Tensor, generated: int, eos_id: int | None
    ) -> Tensor:
        """`scores` (B, vocab) of the token after `tokens` (B, n), `generated` of them new."""
        scores = repetition_penalty(scores, tokens, self.repetition_penalty, real)
        if self.no_repeat_ngram_size:
            banned = banned_ngram_tokens(tokens, self.no_repeat_ngram_size, scores.size(-1), real)
            scores = scores.masked_fill(banned, float("-inf"))
        if self.suppress_tokens:
            ids = torch.tensor(self.suppress_tokens, device=scores.device)
            scores = suppress(scores, ids)
        if eos_id is not None and self.min_new_tokens:
            scores = hold_back_eos(scores, eos_id, generated, self.min_new_tokens)
        return scores


# ---------------------------------------------------------------------------
# Driving the model.


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and inference mode, with every submodule's previous mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _check_prompt(prompt_ids: Tensor, vocab_size: int) -> None:
    if prompt_ids.dim() != 2 or prompt_ids.size(1) == 0 or prompt_ids.is_floating_point():
        raise ValueError(
            "prompt_ids must be an integer tensor of shape (batch, length) with length >= 1, "
            f"got {prompt_ids.dtype} of shape {tuple(prompt_ids.shape)}; "
            "add a batch dimension with ids[None]"
        )
    low, high = int(prompt_ids.min()), int(prompt_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"prompt_ids must lie in [0, {vocab_size}), got ids from {low} to {high}; "
            "encode the prompt with the model's own vocabulary"
        )


class _Context:
    """Feeds the model the tokens it has not seen yet and returns next-token logits.

    Keeps the model's input within its limits as the module docstring says: a
    window of `context` positions (default the model's `max_context`; none for
    a Llama or an LSTM), and a KV cache of that size (or of the training window,
    `block_size`, where the model has no limit). `pad` (B, total) marks the
    left padding of prompts of different lengths; the model never reads it.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        total_len: int,
        use_cache: bool,
        device: torch.device,
        context: int | None = None,
        pad: Tensor | None = None,
    ) -> None:
        self.model = model
        self.limit: int | None = context or model.max_context
        self.pad = pad  # (B, total_len), True at padding; None: no row is padded
        # Padding is left-aligned: columns from here on hold none (read once, not every step).
        self.padded_columns = 0 if pad is None else int(pad.sum(1).max())
        self.state: State | None = None
        self.capacity: int | None = None  # positions the state holds; None: any number
        self.seen = 0  # tokens of the sequence the state already holds, counted from its start
        if use_cache:
            param = next((p for p in model.parameters() if p.is_floating_point()), None)
            dtype = torch.float32 if param is None else param.dtype
            # No larger than the sequence will get: a long window costs no memory here.
            size = min(self.limit or model.config.block_size, total_len)
            self.state = model.new_state(batch_size, max_len=size, device=device, dtype=dtype)
            self.capacity = self.state.capacity

    def _read(self, tokens: Tensor, begin: int, end: int) -> Tensor:
        """The model's logits for tokens [begin, end) of the sequence, its padding marked."""
        pad = None if begin >= self.padded_columns else self.pad[:, begin:end]
        return self.model(tokens[:, begin:end], state=self.state, pad_mask=pad)

    def logits(self, tokens: Tensor) -> Tensor:
        """Logits (B, vocab) for the position after `tokens` (B, n), the whole sequence so far."""
        n = tokens.size(1)
        if self.state is None:
            begin = 0 if self.limit is None else max(0, n - self.limit)
            return self._read(tokens, begin, n)[:, -1]
        capacity = self.capacity
        if self.state.length == 0:  # prefill: the longest suffix that fits
            begin = 0 if capacity is None else max(0, n - capacity)
        elif capacity is not None and self.state.length + n - self.seen > capacity:
            # Positions are absolute, so a full cache cannot just drop its oldest entry: start
            # over from the newest half, leaving room for capacity // 2 cheap steps.
            self.state.reset()
            begin = max(0, n - max(1, capacity // 2))
        else:
            begin = self.seen
        self.seen = n
        return self._read(tokens, begin, n)[:, -1]

    def reorder(self, index: Tensor, tokens: Tensor) -> None:
        """Keep batch rows `index`, in that order (beams that survived a step).

        `tokens` (B, n) is the sequence so far, before the reorder. Two rows whose cached
        tokens agree up to some position hold the same keys and values up to there (up to
        float rounding between batch rows), so a KV cache copies only what follows the
        first position where a row and its source differ. Finding that position reads
        the tokens on the host, free on the CPU; on an accelerator it would wait for the
        device every step, so there every row is copied whole, on the device.
        """
        if self.pad is not None:
            self.pad = self.pad[index]
        if self.state is None:
            return
        keep = 0
        if index.numel() == tokens.size(0) and tokens.device.type == "cpu":
            window = tokens[:, self.seen - self.state.length : self.seen]
            differs = (window != window[index]).any(dim=0)  # (cached positions,)
            keep = int(differs.int().argmax()) if bool(differs.any()) else self.state.length
        self.state.reorder(index, keep)


def generate(
    model: nn.Module,
    prompt_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    stop_at_eos: bool = False,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_token: Callable[[Tensor], None] | None = None,
    context: int | None = None,
    controls: Controls = Controls(),
    pad_mask: Tensor | None = None,
    stop: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Prompt plus up to `max_new_tokens` new tokens, (B, T + new).

    `prompt_ids` (B, T) holds B prompts; prompts of different lengths are
    left-padded (with any token id) and `pad_mask` (B, T) is True at the
    padding, which the model never reads: each row continues exactly as its
    prompt alone would. `controls` (repetition penalty, no-repeat n-grams,
    suppressed tokens, minimum length) act on the logits before top-k,
    temperature and top-p. With `stop_at_eos`, a row that has emitted `eos_id`
    emits `eos_id` from then on, and the loop stops early, returning fewer
    columns, once every row has. `stop(new_tokens)` (B, new) -> (B,) bool, if
    given, ends rows the same way (a stop string in their text). `use_cache=False` recomputes the whole
    context every step: slower, and the reference the cached path is tested
    against. Sequences longer than the window (`context`, default the model's
    `max_context`) shift it as the module docstring says. `on_token(next_ids)`,
    if given, sees each step's new tokens (B,) as soon as they are chosen (to
    stream them). The model runs in eval mode; its previous mode is restored.
    """
    vocab_size = model.config.vocab_size
    top_k = check_decoding_args(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        stop_at_eos=stop_at_eos,
        vocab_size=vocab_size,
    )
    controls.check(max_new_tokens, vocab_size)
    _check_prompt(prompt_ids, vocab_size)
    batch_size, prompt_len = prompt_ids.shape
    total = prompt_len + max_new_tokens
    tokens = prompt_ids.new_empty(batch_size, total)
    tokens[:, :prompt_len] = prompt_ids
    pad = _sequence_padding(pad_mask, prompt_ids, total)
    length = prompt_len
    with _inference(model):
        window = _Context(model, batch_size, total, use_cache, prompt_ids.device, context, pad)
        done = torch.zeros(batch_size, dtype=torch.bool, device=prompt_ids.device)
        ends = stop_at_eos or stop is not None
        for step in range(max_new_tokens):
            logits = window.logits(tokens[:, :length])
            if controls.active:
                real = torch.ones_like(tokens[:, :length], dtype=torch.bool)
                if pad is not None:
                    real = ~pad[:, :length]
                logits = controls.apply(logits, tokens[:, :length], real, step, eos_id)
            next_ids = sample_next(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            if ends:
                filler = tokens[:, length - 1] if eos_id is None else eos_id
                next_ids = torch.where(done, filler, next_ids)
            if stop_at_eos:
                done |= next_ids == eos_id
            tokens[:, length] = next_ids
            length += 1
            if stop is not None:
                done |= stop(tokens[:, prompt_len:length])
            if on_token is not None:
                on_token(next_ids)
            if ends and bool(done.all()):
                break
    return tokens[:, :length].clone()


def _sequence_padding(pad_mask: Tensor | None, prompt_ids: Tensor, total: int) -> Tensor | None:
    """(B, total) True at the prompts' left padding, False at every other position."""
    if pad_mask is None or not bool(pad_mask.any()):
        return None
    if pad_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"pad_mask must have the prompts' shape {tuple(prompt_ids.shape)}, "
            f"got {tuple(pad_mask.shape)}"
        )
    if bool((pad_mask[:, 1:] & ~pad_mask[:, :-1]).any()) or bool(pad_mask[:, -1].any()):
        raise ValueError("pad_mask must mark left padding: each row's padding first, then tokens")
    pad = torch.zeros(prompt_ids.size(0), total, dtype=torch.bool, device=prompt_ids.device)
    pad[:, : prompt_ids.size(1)] = pad_mask
    return pad


def beam_search(
    model: nn.Module,
    prompt_ids: Tensor,
    max_new_tokens: int,
    *,
    num_beams: int,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
    stop_at_eos: bool = False,
    use_cache: bool = True,
    context: int | None = None,
    controls: Controls = Controls(),
    pad_mask: Tensor | None = None,
    early_stopping: bool | str = True,
    num_return_sequences: int = 1,
) -> tuple[Tensor, Tensor]:
    """The best continuations of each prompt by beam search: (sequences, scores).

    Beams are ranked by their summed log-probabilities (after `controls`, which
    act on the log-probabilities here, as in Hugging Face). A finished
    hypothesis (one that emitted `eos_id` with `stop_at_eos`, or any beam still
    running after `max_new_tokens`) scores sum_logprob /
    generated_len**length_penalty, where generated_len counts the new tokens,
    eos included, as in Hugging Face transformers; each prompt keeps its
    `num_beams` best. `early_stopping` has Hugging Face's meaning: True, a
    prompt is done once `num_beams` hypotheses have finished (fairseq's rule);
    False, once no running beam can still beat the worst of them at its current
    length; "never", at any length up to `max_new_tokens`. The result holds the
    `num_return_sequences` best hypotheses of each prompt, best first: (B * n,
    T + L) sequences, shorter ones padded with `eos_id`, and (B * n,) scores.
    With `num_beams=1` this is greedy decoding. Prompts of different lengths
    are left-padded with `pad_mask`, and long sequences shift their window, as
    in `generate`.
    """
    vocab_size = model.config.vocab_size
    check_decoding_args(
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        length_penalty=length_penalty,
        eos_id=eos_id,
        stop_at_eos=stop_at_eos,
        vocab_size=vocab_size,
    )
    check_beam_args(num_beams, early_stopping, num_return_sequences)
    controls.check(max_new_tokens, vocab_size)
    _check_prompt(prompt_ids, vocab_size)
    batch_size, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    returned = num_return_sequences
    if max_new_tokens == 0:
        sequences = prompt_ids.repeat_interleave(returned, dim=0)
        return sequences, torch.zeros(batch_size * returned, device=device)

    beams = num_beams
    total = prompt_len + max_new_tokens
    # Candidates per prompt: with 2 * beams, at least `beams` are not eos (one eos per beam).
    num_candidates = min(2 * beams if stop_at_eos else beams, beams * vocab_size)
    rank = torch.arange(num_candidates, device=device)
    batch_offset = torch.arange(batch_size, device=device)[:, None] * beams  # (B, 1)
    finished = [_Hypotheses(beams, length_penalty, early_stopping) for _ in range(batch_size)]
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    pad = _sequence_padding(pad_mask, prompt_ids, total)

    with _inference(model):
        window = _Context(model, batch_size, total, use_cache, device, context, pad)
        logits = window.logits(prompt_ids)  # (B, vocab)
        # All beams start as the prompt; prefill once, then copy rows.
        rows = torch.arange(batch_size, device=device).repeat_interleave(beams)
        window.reorder(rows, prompt_ids)
        logits = logits[rows]  # (B * beams, vocab)
        tokens = prompt_ids.new_empty(batch_size * beams, total)
        tokens[:, :prompt_len] = prompt_ids[rows]
        # Identical beams would yield the same candidate `beams` times: expand only the first.
        beam_scores = torch.full((batch_size, beams), float("-inf"), device=device)
        beam_scores[:, 0] = 0.0

        for step in range(max_new_tokens):
            length = prompt_len + step
            if step > 0:
                logits = window.logits(tokens[:, :length])
            logprobs = F.log_softmax(logits.float(), dim=-1)  # (B * beams, vocab)
            if controls.active:
                real = torch.ones_like(tokens[:, :length], dtype=torch.bool)
                if window.pad is not None:
                    real = ~window.pad[:, :length]
                logprobs = controls.apply(logprobs, tokens[:, :length], real, step, eos_id)
            scores = (beam_scores.view(-1, 1) + logprobs).view(batch_size, -1)
            cand_scores, cand_index = scores.topk(num_candidates, dim=-1)  # (B, C), descending
            cand_beam = torch.div(cand_index, vocab_size, rounding_mode="floor")
            cand_token = cand_index % vocab_size

            if stop_at_eos:
                is_eos = cand_token == eos_id
                # HF: only an eos ranked among the best `beams` candidates finishes a hypothesis.
                new_finished = (
                    is_eos & (rank < beams) & cand_scores.isfinite() & ~done[:, None]
                ).nonzero()
                for b, c in new_finished.tolist():
                    row = b * beams + int(cand_beam[b, c])
                    hypothesis = torch.cat([tokens[row, :length], cand_token[b, c, None]])
                    finished[b].add(float(cand_scores[b, c]), step + 1, hypothesis)
                # The best `beams` candidates that are not eos carry on, best first.
                pick = (is_eos.long() * num_candidates + rank).argsort(dim=-1)[:, :beams]
                cand_scores = cand_scores.gather(1, pick)
                cand_beam = cand_beam.gather(1, pick)
                cand_token = cand_token.gather(1, pick)
                best_running = cand_scores[:, 0].tolist()
                for b in range(batch_size):
                    if not done[b]:
                        done[b] = finished[b].is_done(best_running[b], step + 1, max_new_tokens)
                if bool(done.all()):
                    break

            beam_scores = cand_scores
            rows = (batch_offset + cand_beam).view(-1)
            window.reorder(rows, tokens[:, :length])
            tokens = tokens[rows]
            tokens[:, length] = cand_token.view(-1)
        else:  # ran out of steps: the surviving beams are hypotheses too
            for b in range(batch_size):
                if done[b]:
                    continue
                for k in range(beams):
                    if math.isfinite(float(beam_scores[b, k])):
                        finished[b].add(
                            float(beam_scores[b, k]), max_new_tokens, tokens[b * beams + k]
                        )

    best = [hypothesis for prompt in finished for hypothesis in prompt.best(returned)]
    longest = max(hypothesis.numel() for _, hypothesis in best)
    filler = 0 if eos_id is None else eos_id  # lengths differ only when eos ends some
    sequences = prompt_ids.new_full((len(best), longest), filler)
    for i, (_, hypothesis) in enumerate(best):
        sequences[i, : hypothesis.numel()] = hypothesis
    scores = torch.tensor([score for score, _ in best], device=device)
    return sequences, scores


EARLY_STOPPING = (True, False, "never")


def check_beam_args(num_beams: int, early_stopping: bool | str, num_return_sequences: int) -> None:
    """Raise `ValueError` for a bad `early_stopping` or `num_return_sequences`."""
    if early_stopping not in EARLY_STOPPING or not isinstance(early_stopping, bool | str):
        raise ValueError(
            f"early_stopping must be true, false or never, got {early_stopping!r}; true stops "
            "a prompt once num_beams hypotheses have finished (Hugging Face's meaning)"
        )
    if not (is_int(num_return_sequences) and 1 <= num_return_sequences <= num_beams):
        raise ValueError(
            f"num_return_sequences must be an integer from 1 to num_beams={num_beams}, got "
            f"{num_return_sequences!r}; a beam search returns at most its beams"
        )


class _Hypotheses:
    """The `size` best finished hypotheses of one prompt (Hugging Face's BeamHypotheses)."""

    def __init__(self, size: int, length_penalty: float, early_stopping: bool | str) -> None:
        self.size, self.length_penalty, self.early_stopping = size, length_penalty, early_stopping
        self.kept: list[tuple[float, Tensor]] = []

    def add(self, sum_logprobs: float, generated: int, hypothesis: Tensor) -> None:
        self.kept.append((sum_logprobs / generated**self.length_penalty, hypothesis))
        self.kept.sort(key=lambda pair: pair[0], reverse=True)
        del self.kept[self.size :]

    def is_done(self, best_running: float, generated: int, max_new_tokens: int) -> bool:
        """No running beam (the best sums `best_running`) can enter the kept ones any more."""
        if len(self.kept) < self.size:
            return False
        if self.early_stopping is True:
            return True
        longest = generated
        if self.early_stopping == "never" and self.length_penalty > 0:
            longest = max_new_tokens  # a longer hypothesis divides by more
        return self.kept[-1][0] >= best_running / longest**self.length_penalty

    def best(self, n: int) -> list[tuple[float, Tensor]]:
        return self.kept[:n]
