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
    `block_size`, where the model has no limit).
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        total_len: int,
        use_cache: bool,
        device: torch.device,
        context: int | None = None,
    ) -> None:
        self.model = model
        self.limit: int | None = context or model.max_context
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

    def logits(self, tokens: Tensor) -> Tensor:
        """Logits (B, vocab) for the position after `tokens` (B, n), the whole sequence so far."""
        n = tokens.size(1)
        if self.state is None:
            return self.model(tokens if self.limit is None else tokens[:, -self.limit :])[:, -1]
        capacity = self.capacity
        if self.state.length == 0:  # prefill: the longest suffix that fits
            fresh = tokens if capacity is None else tokens[:, -capacity:]
        elif capacity is not None and self.state.length + n - self.seen > capacity:
            # Positions are absolute, so a full cache cannot just drop its oldest entry: start
            # over from the newest half, leaving room for capacity // 2 cheap steps.
            self.state.reset()
            fresh = tokens[:, -max(1, capacity // 2) :]
        else:
            fresh = tokens[:, self.seen :]
        self.seen = n
        return self.model(fresh, state=self.state)[:, -1]

    def reorder(self, index: Tensor, tokens: Tensor) -> None:
        """Keep batch rows `index`, in that order (beams that survived a step).

        `tokens` (B, n) is the sequence so far, before the reorder. Two rows whose cached
        tokens agree up to some position hold the same keys and values up to there (up to
        float rounding between batch rows), so a KV cache copies only what follows the
        first position where a row and its source differ.
        """
        if self.state is None:
            return
        keep = 0
        if index.numel() == tokens.size(0):
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
) -> Tensor:
    """Prompt plus up to `max_new_tokens` new tokens, (B, T + new).

    `prompt_ids` (B, T) holds B prompts of the same length T: the model has no
    padding mask, so group prompts by length (or left-pad them with tokens you
    accept as context). With `stop_at_eos`, a row that has emitted `eos_id`
    emits `eos_id` from then on, and the loop stops early, returning fewer
    columns, once every row has. `use_cache=False` recomputes the whole
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
    _check_prompt(prompt_ids, vocab_size)
    batch_size, prompt_len = prompt_ids.shape
    tokens = prompt_ids.new_empty(batch_size, prompt_len + max_new_tokens)
    tokens[:, :prompt_len] = prompt_ids
    length = prompt_len
    with _inference(model):
        window = _Context(
            model, batch_size, prompt_len + max_new_tokens, use_cache, prompt_ids.device, context
        )
        done = torch.zeros(batch_size, dtype=torch.bool, device=prompt_ids.device)
        for _ in range(max_new_tokens):
            logits = window.logits(tokens[:, :length])
            next_ids = sample_next(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            if stop_at_eos:
                next_ids = next_ids.masked_fill(done, eos_id)
                done |= next_ids == eos_id
            tokens[:, length] = next_ids
            length += 1
            if on_token is not None:
                on_token(next_ids)
            if stop_at_eos and bool(done.all()):
                break
    return tokens[:, :length].clone()


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
) -> tuple[Tensor, Tensor]:
    """The best continuation of each prompt by beam search: (sequences (B, T + L), scores (B,)).

    Beams are ranked by their summed log-probabilities. A finished hypothesis
    (one that emitted `eos_id` with `stop_at_eos`, or any beam still running
    after `max_new_tokens`) scores sum_logprob / generated_len**length_penalty,
    where generated_len counts the new tokens, eos included, as in Hugging
    Face transformers. A prompt is done once `num_beams` hypotheses have
    finished (Hugging Face's `early_stopping=True`, fairseq's rule). Sequences
    shorter than the longest are padded with `eos_id`. With `num_beams=1` this
    is greedy decoding. Prompts share one length and long sequences shift
    their window, as in `generate`.
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
    _check_prompt(prompt_ids, vocab_size)
    batch_size, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    if max_new_tokens == 0:
        return prompt_ids.clone(), torch.zeros(batch_size, device=device)

    beams = num_beams
    # Candidates per prompt: with 2 * beams, at least `beams` are not eos (one eos per beam).
    num_candidates = min(2 * beams if stop_at_eos else beams, beams * vocab_size)
    rank = torch.arange(num_candidates, device=device)
    batch_offset = torch.arange(batch_size, device=device)[:, None] * beams  # (B, 1)
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(batch_size)]
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)

    with _inference(model):
        window = _Context(
            model, batch_size, prompt_len + max_new_tokens, use_cache, device, context
        )
        logits = window.logits(prompt_ids)  # (B, vocab)
        # All beams start as the prompt; prefill once, then copy rows.
        rows = torch.arange(batch_size, device=device).repeat_interleave(beams)
        window.reorder(rows, prompt_ids)
        logits = logits[rows]  # (B * beams, vocab)
        tokens = prompt_ids.new_empty(batch_size * beams, prompt_len + max_new_tokens)
        tokens[:, :prompt_len] = prompt_ids[rows]
        # Identical beams would yield the same candidate `beams` times: expand only the first.
        beam_scores = torch.full((batch_size, beams), float("-inf"), device=device)
        beam_scores[:, 0] = 0.0

        for step in range(max_new_tokens):
            length = prompt_len + step
            if step > 0:
                logits = window.logits(tokens[:, :length])
            logprobs = F.log_softmax(logits.float(), dim=-1)  # (B * beams, vocab)
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
                    score = float(cand_scores[b, c]) / (step + 1) ** length_penalty
                    finished[b].append((score, hypothesis))
                    if len(finished[b]) >= beams:
                        done[b] = True
                if bool(done.all()):
                    break
                # The best `beams` candidates that are not eos carry on, best first.
                pick = (is_eos.long() * num_candidates + rank).argsort(dim=-1)[:, :beams]
                cand_scores = cand_scores.gather(1, pick)
                cand_beam = cand_beam.gather(1, pick)
                cand_token = cand_token.gather(1, pick)

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
                        score = float(beam_scores[b, k]) / max_new_tokens**length_penalty
                        finished[b].append((score, tokens[b * beams + k]))

    best = [max(hypotheses, key=lambda pair: pair[0]) for hypotheses in finished]
    longest = max(hypothesis.numel() for _, hypothesis in best)
    pad = 0 if eos_id is None else eos_id  # lengths differ only when eos ends some
    sequences = prompt_ids.new_full((batch_size, longest), pad)
    for b, (_, hypothesis) in enumerate(best):
        sequences[b, : hypothesis.numel()] = hypothesis
    scores = torch.tensor([score for score, _ in best], device=device)
    return sequences, scores
