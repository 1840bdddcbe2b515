"""The neural cache (Grave et al. 2017, "Improving neural language models with a continuous cache").

The model's final hidden states h_i (what its output layer reads) and the
tokens x_{i+1} that followed them are kept for the last `size` positions read.
The next token after position t then also gets the cache's distribution

    p_cache(w) = sum_i [x_{i+1} = w] exp(theta h_t . h_i) / sum_i exp(theta h_t . h_i)

and is scored by p(w) = (1 - lambda) p_model(w) + lambda p_cache(w). The cache
holds only earlier positions: position t is scored with positions < t, and only
then joins it (within a window too), so no token is ever scored by a cache
that has seen it. A position whose cache is still empty (the first of the
text) is scored by the model alone. awd-lstm-lm's pointer.py is the reference
(`--window`, `--theta`, `--lambdasm`); it leaves the cache out until `window`
positions have been read, where here it counts from the first one.

The text is read as one stream, in order, as dynamic evaluation reads it
(`streams.one_stream`): an LSTM in consecutive windows of `seq_len`, its state
carried; a Transformer in windows of `seq_len` advancing by `stride`. The
mixture is computed in log space on top of the fused loss (see `log_gain`), so
`lambda=0` gives the model's perplexity of the same windows exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from lmlab.loss import IGNORE_INDEX
from lmlab.streams import one_stream


@dataclass(frozen=True)
class NeuralCache:
    """`cache.*` of conf/eval.yaml (`lambda_` is `cache.lambda`, a Python keyword)."""

    size: int  # earlier positions held (Grave: 100 to 2,000; awd-lstm-lm's PTB run: 500)
    theta: float  # sharpness of the match between hidden states (0: every entry alike)
    lambda_: float  # the cache's share of the mixture, in [0, 1]

    def to_dict(self) -> dict[str, float | int]:
        return {"size": self.size, "theta": self.theta, "lambda": self.lambda_}


class CacheMemory:
    """The last `size` (hidden state, next token) pairs read, and what they add to each score."""

    def __init__(self, settings: NeuralCache) -> None:
        self.settings = settings
        self.keys: Tensor | None = None  # (M, C) float32 hidden states, oldest first
        self.values: Tensor | None = None  # (M,) the token that followed each

    @torch.no_grad()
    def log_gain(self, model: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
        """log p(w) - log p_model(w) of each scored position of one window; then they join.

        `hidden` (1, T, C): the window's `model.hidden_states`; `targets` (1, T),
        IGNORE_INDEX where not scored. A window's cache score is its model NLL
        (the fused loss, as static evaluation) minus the sum of these: with
        `lambda` 0 every gain is exactly 0.
        """
        scored = targets[0] != IGNORE_INDEX
        w = targets[0, scored]  # (N,)
        model_logits = model.output(hidden[0, scored][None])[0]  # (N, vocab), the model's dtype
        log_model = torch.log_softmax(model_logits.float(), dim=-1)
        h = hidden[0, scored].float()  # (N, C)
        log_model = log_model.gather(1, w[:, None])[:, 0]  # (N,)
        held = 0 if self.keys is None else len(self.keys)
        keys = h if self.keys is None else torch.cat([self.keys, h])  # (M + N, C)
        values = w if self.values is None else torch.cat([self.values, w])
        # Query n sits at index held + n and sees the `size` entries just before it.
        query = torch.arange(held, held + len(h), device=h.device)[:, None]
        index = torch.arange(len(keys), device=h.device)[None, :]
        seen = (index < query) & (index >= query - self.settings.size)  # (N, M + N)
        logits = (self.settings.theta * h @ keys.T).masked_fill(~seen, -math.inf)
        match = seen & (values[None, :] == w[:, None])
        # log p_cache(w): -inf where w is not in the cache; nan where the cache is empty
        log_cache = torch.logsumexp(logits.masked_fill(~match, -math.inf), dim=1) - torch.logsumexp(
            logits, dim=1
        )
        lam = self.settings.lambda_
        log_mixed = torch.logaddexp(
            log_model + math.log1p(-lam) if lam < 1 else torch.full_like(log_model, -math.inf),
            log_cache + (math.log(lam) if lam > 0 else -math.inf),
        )
        # an empty cache (nothing seen yet) leaves the model alone
        gain = torch.where(seen.any(dim=1), log_mixed - log_model, 0.0)
        self.keys, self.values = keys[-self.settings.size :], values[-self.settings.size :]
        return gain


def cache_perplexity(
    model: nn.Module,
    tokens: Tensor,
    settings: NeuralCache,
    *,
    seq_len: int,
    stride: int | None = None,
    eos_id: int = 0,
) -> dict[str, float | int | list[float]]:
    """Perplexity of `tokens` (1-D ids) with the cache, and the model's own of the same windows.

    Windows as `perplexity(seq_len=..., stride=..., batch_size=1)` reads them
    (an LSTM: `order="contiguous"`, its state carried); `scores` holds each
    window's NLL with the cache.
    """
    device = next(model.parameters()).device
    memory = CacheMemory(settings)
    state = model.new_state(1) if model.carries_state else None
    step = seq_len if model.carries_state or stride is None else stride
    model.eval()
    total, plain, count, scores = 0.0, 0.0, 0, []
    with torch.inference_mode():
        for inputs, targets in one_stream(
            tokens, step, seq_len, eos_id, carried=model.carries_state
        ):
            inputs, targets = inputs.to(device), targets.to(device)
            hidden = model.hidden_states(inputs, state=state)
            nll, counted = model.output(hidden, targets, reduction="sum")
            gain = memory.log_gain(model, hidden, targets).sum(dtype=torch.float64)
            scores.append(float(nll) - float(gain))
            total, plain, count = total + scores[-1], plain + float(nll), count + int(counted)
    mean, model_mean = total / max(count, 1), plain / max(count, 1)
    return {
        "tokens": count,
        "nll": mean,
        "ppl": math.exp(mean),
        "model_nll": model_mean,
        "model_ppl": math.exp(model_mean),
        "scores": scores,
    }
