"""`KVCache`: the decoding state of the Transformer families, one fixed-size buffer per run."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every layer for the positions decoded so far.

    Preallocated once for `max_len` positions, (layers, B, heads, max_len,
    head_dim), so each decoding step writes one position per layer instead of
    concatenating tensors. `length` is the next position to write.

    A `static` cache gives the one-token step static shapes, so that it can be
    captured in a CUDA graph or compiled once: the step writes at `position`, a
    device tensor that follows `length`, and attends over the whole buffer with
    `step_mask` instead of a view of the filled part; its beam reorder copies
    rows without reading anything back to the host. On CPU eager the length-bounded
    view is faster (the static step took 1-12% longer at batch 1 to 32 in the `small`
    shape, 2026-12-04, and torch.compile of it was no faster there), so a cache is
    static by default only off the CPU.
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
        static: bool | None = None,
    ) -> None:
        self.max_len = max_len
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled; the next token goes at this position
        # Leading padding slots per row (B,), for prompts of different lengths left-padded
        # into one batch; None: no row is padded. Row r's real tokens start at offset[r].
        self.offset: Tensor | None = None
        # Chosen before the first forward (`position` follows `length` only in a static cache).
        self.static = self.keys.device.type != "cpu" if static is None else static
        # `length` as a 0-d tensor on the device, advanced with it: what a static step reads.
        self.position = torch.zeros((), dtype=torch.long, device=self.keys.device)
        # The model's weights in the layout its one-token step reads, made by that step on
        # first use. A cache belongs to the weights it was filled with, like its keys.
        self.step_weights: tuple | None = None

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

    def write_step(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store one position's (B, nh, 1, hd) keys and values at `position`; return the
        whole buffers (B, nh, max_len, hd), to be read with `step_mask` (static shapes)."""
        if self.length >= self.max_len:
            raise ValueError(f"KV cache overflow: {self.length + 1} positions > {self.max_len}")
        where = self.position.view(1)
        self.keys[layer].index_copy_(2, where, k)
        self.values[layer].index_copy_(2, where, v)
        return self.keys[layer], self.values[layer]

    def step_mask(self) -> Tensor:
        """Which slots the query at `position` sees: (1, max_len), or (B, 1, 1, max_len)
        without each row's leading padding. Slots past `position` hold stale or zero values."""
        slots = torch.arange(self.max_len, device=self.position.device)
        mask = slots <= self.position
        if self.offset is None:
            return mask[None]
        return (mask & (slots[None, :] >= self.offset[:, None]))[:, None, None]

    def advance(self, steps: int) -> None:
        """Count `steps` positions as filled (every layer has written them)."""
        self.length += steps
        if self.static:  # on the device: no host sync, the same tensor for a graph
            self.position += steps

    def reorder(self, index: Tensor, keep: int = 0) -> None:
        """Keep batch rows `index` (in that order), e.g. the surviving beams.

        Beam search reorders every step, so when the batch size stays the same
        only rows that change are copied, in place, and only from position
        `keep` on: the caller passes how many leading positions every row
        already shares with its source (beams share most of their history, and
        copying it all each step would cost more than the model's forward).
        """
        if self.offset is not None:
            self.offset = self.offset[index]
        if index.numel() != self.keys.size(1):  # the batch grows or shrinks
            self.keys = self.keys.index_select(1, index)
            self.values = self.values.index_select(1, index)
            return
        if self.static:  # every row, gathered on the device into the same buffers: no sync
            filled = slice(keep, self.length)
            self.keys[:, :, :, filled] = self.keys[:, :, :, filled].index_select(1, index)
            self.values[:, :, :, filled] = self.values[:, :, :, filled].index_select(1, index)
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
        self.position.zero_()
        self.offset = None

    def start_rows(self, pad_mask: Tensor | None) -> Tensor | None:
        """The rows' padding offsets for this forward: set by the prefill, then kept."""
        if self.length == 0:
            self.offset = None if pad_mask is None else pad_mask.sum(1)
        elif pad_mask is not None and bool(pad_mask.any()):
            raise ValueError("padding may only lead a prompt: pass pad_mask with the prefill")
        return self.offset


def visible(start: int, length: int, offset: Tensor | None, device: torch.device) -> Tensor:
    """Which positions each of `length` new queries (at `start` on) sees: the causal mask.

    (length, start + length); with `offset` (B,), each row's leading padding slots
    are hidden too, giving (B, 1, length, start + length). A padding query still
    sees itself, so that no row of the softmax is empty.
    """
    keys = torch.arange(start + length, device=device)
    queries = torch.arange(start, start + length, device=device)
    causal = keys[None, :] <= queries[:, None]
    if offset is None:
        return causal
    real = keys[None, :] >= offset[:, None]  # (B, start + length)
    own = keys[None, :] == queries[:, None]
    return ((causal[None] & real[:, None]) | own[None])[:, None]


def positions(start: int, length: int, offset: Tensor | None, device: torch.device) -> Tensor:
    """The positions of `length` new tokens: (length,), or (B, length) counted from each
    row's first real token (padding slots get 0)."""
    slots = torch.arange(start, start + length, device=device)
    if offset is None:
        return slots
    return (slots[None, :] - offset[:, None]).clamp(min=0)
