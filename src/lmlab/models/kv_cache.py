"""`KVCache`: the decoding state of the Transformer families, one fixed-size buffer per run."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every layer for the positions decoded so far.

    Preallocated once for `max_len` positions, (layers, B, heads, max_len,
    head_dim), so each decoding step writes one position per layer instead of
    concatenating tensors. `length` is the next position to write.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = max_len
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled; the next token goes at this position

    @property
    def batch_size(self) -> int:
        return self.keys.size(1)

    @property
    def capacity(self) -> int:
        return self.max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, nh, T, hd) keys and values after the filled part; return all of them."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > {self.max_len}")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, steps: int) -> None:
        """Count `steps` positions as filled (every layer has written them)."""
        self.length += steps

    def reorder(self, index: Tensor, keep: int = 0) -> None:
        """Keep batch rows `index` (in that order), e.g. the surviving beams.

        Beam search reorders every step, so when the batch size stays the same
        only rows that change are copied, in place, and only from position
        `keep` on: the caller passes how many leading positions every row
        already shares with its source (beams share most of their history, and
        copying it all each step would cost more than the model's forward).
        """
        if index.numel() != self.keys.size(1):  # the batch grows or shrinks
            self.keys = self.keys.index_select(1, index)
            self.values = self.values.index_select(1, index)
            return
        moved = (index != torch.arange(index.numel(), device=index.device)).nonzero().squeeze(1)
        if moved.numel() == 0 or keep >= self.length:
            return
        source, stale = index[moved], slice(keep, self.length)
        # The right-hand side is gathered before anything is written, so rows may swap.
        self.keys[:, moved, :, stale] = self.keys[:, source, :, stale]
        self.values[:, moved, :, stale] = self.values[:, source, :, stale]

    def reset(self) -> None:
        """Forget every position; the next forward starts at position 0."""
        self.length = 0
