"""Dropout for every family: `Dropout` with a cheaper CPU mask, and the AWD-LSTM variants.

- `Dropout`: `nn.Dropout` whose CPU mask costs a third of `bernoulli_`'s.
- `LockedDropout` (variational dropout, Gal & Ghahramani 2016): one mask per
  sequence, the same at every time step.
- `embedding_dropout` (Gal & Ghahramani; AWD-LSTM's `dropoute`): whole words of
  the embedding matrix dropped, the same word dropped at every position.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def keep_mask(shape: tuple[int, ...] | torch.Size, p: float, like: Tensor) -> Tensor:
    """A float mask of 0 and 1 / (1 - p) (p rounded to 1/65536), on `like`'s device.

    On CPU, `bernoulli_` costs ~9 ns per element. Here each element gets 16 bits
    of one 64-bit draw from the same generator (so seeding and resuming work as
    before): a third of the cost. The drop probability is `p` rounded to a
    multiple of 1/65536, and kept values are scaled by the inverse of the rounded
    keep probability, so the expectation stays exact. At least float32, so that
    bf16 does not round the scale (1 / 0.9 to 1.109375).
    """
    numel = 1
    for size in shape:
        numel *= size
    dropped = round(p * 65536)
    bits = torch.empty((numel + 3) // 4, dtype=torch.int64, device=like.device)
    bits.random_(-(2**63), None)  # every bit uniform: the full 64-bit range
    # Each int16 is uniform on [-32768, 32767]; `dropped` of its 65536 values drop.
    keep = bits.view(torch.int16)[:numel].view(shape) >= dropped - 32768
    mask = keep.to(torch.promote_types(like.dtype, torch.float32))
    return mask.mul_(65536 / (65536 - dropped))


class Dropout(nn.Dropout):
    """`nn.Dropout` with `keep_mask` on CPU; on other devices `F.dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            # compiled, inductor fuses the mask into its kernel (no graph break)
            return F.dropout(x, self.p, training=True)
        # The scale rides on a float mask: one multiply each way, autograd saves only
        # the mask, and no 0/1 mask of another dtype is converted on every multiply.
        return (x * keep_mask(x.shape, self.p, x)).to(x.dtype)


class LockedDropout(nn.Module):
    """Dropout of (B, T, C) activations with one (B, 1, C) mask: the same units at every step."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            mask = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - self.p) / (1 - self.p)
            return x * mask
        return (x * keep_mask((x.size(0), 1, x.size(2)), self.p, x)).to(x.dtype)


def embedding_dropout(embedding: nn.Embedding, idx: Tensor, p: float, training: bool) -> Tensor:
    """`embedding(idx)` with whole words dropped: row w of the table is zero everywhere or nowhere."""
    if not training or p == 0.0:
        return embedding(idx)
    weight = embedding.weight
    if weight.device.type == "cpu" and not torch.compiler.is_compiling():
        mask = keep_mask((weight.size(0), 1), p, weight)
    else:
        mask = weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p)
    return F.embedding(idx, weight * mask.to(weight.dtype))
