"""The contiguous data order (`data.order=contiguous`): parallel streams read in consecutive windows.

The classic PTB set-up (Zaremba et al. 2014, AWD-LSTM, Transformer-XL): a
split's token stream is cut into `batch_size` equal streams (`batch_size` x
processes under DDP, each process reading its own), and batch i holds the i-th
window of `seq_len` tokens of every stream. Window i + 1 of a row continues
window i of the same row, so a model that carries state (the LSTM) hands its
final state of one batch to the next: truncated backpropagation through time
in training, and a whole split read with all of its context in evaluation.

Training drops the last partial window of each stream (every batch has the
same shape); evaluation pads the end of the split instead (inputs `<eos>`,
targets IGNORE_INDEX), so every token of the split is predicted exactly once.
Windows are gathered from the token array by index, never copied whole.

`sliding_windows` is the other way evaluation reads one stream: overlapping
windows that each score only the tokens not scored before (`eval.py stride=`).
`one_stream` reads a split as one stream in order, each way, for what carries
something from window to window: dynamic evaluation and the neural cache.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from lmlab.errors import UserError
from lmlab.loss import IGNORE_INDEX
from lmlab.token_file import TokenFile

# A split's token ids: in memory, or read from the cache by position.
Tokens = Tensor | np.ndarray | TokenFile


class StreamWindows(Dataset):
    """Batch i: (inputs, targets), each (streams, seq_len), window i of this process's streams.

    The stream of a split starts with `<eos>` (the end of an imaginary previous
    line), so its first token is predicted too, as in `data.TokenBlocks`.
    Stream g of the `streams * world_size` covers targets [g L, (g + 1) L);
    process `rank` reads streams `rank * streams` to `(rank + 1) * streams - 1`,
    so one process with 2 S streams reads exactly the windows two processes
    with S streams each read.
    """

    def __init__(
        self,
        tokens: Tokens,
        streams: int,
        seq_len: int,
        pad_last: bool,
        eos_id: int = 0,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
    ) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.total = len(tokens)
        every = streams * world_size
        if pad_last:  # every token once; the end of the split padded
            self.stream_len = -(-self.total // every)
            self.windows = -(-self.stream_len // seq_len)
        else:  # whole windows only
            self.stream_len = self.total // every
            self.windows = self.stream_len // seq_len
        if self.windows == 0:
            raise UserError(
                f"data.order=contiguous: the {split} split's {self.total} tokens make "
                f"{every} streams of {self.stream_len} tokens, shorter than one window of "
                f"data.seq_len={seq_len}; lower data.batch_size or data.seq_len"
            )
        first = rank * streams
        self.starts = torch.arange(first, first + streams) * self.stream_len  # (streams,)
        self.offsets = torch.arange(seq_len)

    def __len__(self) -> int:
        return self.windows

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        # Target positions in the split, (streams, seq_len); position p's input is token p - 1.
        position = self.starts[:, None] + index * self.seq_len + self.offsets[None, :]
        end = self.starts[:, None] + self.stream_len
        real = (position < end) & (position < self.total)
        return next_token_pairs(self.tokens, position, real, self.eos_id)


def next_token_pairs(
    tokens: Tokens, position: Tensor, real: Tensor, eos_id: int
) -> tuple[Tensor, Tensor]:
    """(inputs, targets) for target `position`s in the split; position p's input is token p - 1
    (`<eos>` at position 0). Where `real` is False: input `<eos>`, target IGNORE_INDEX."""
    where = position.clamp(max=len(tokens) - 1)
    targets = take_tokens(tokens, where).masked_fill(~real, IGNORE_INDEX)
    previous = take_tokens(tokens, (where - 1).clamp(min=0))
    inputs = previous.masked_fill((position == 0) | ~real, eos_id)
    return inputs, targets


def take_tokens(tokens: Tokens, index: Tensor) -> Tensor:
    """`tokens[index]` as int64, from a tensor, or a NumPy array or `TokenFile` of any int type."""
    if isinstance(tokens, Tensor):
        return tokens[index].long()
    return torch.from_numpy(np.asarray(tokens[index.numpy()], dtype=np.int64))


class WindowOrder(Sampler[int]):
    """Window indices 0, 1, 2, ... in order, every epoch; resumable mid-epoch like `BlockBatches`."""

    def __init__(self, windows: int) -> None:
        self.windows = windows
        self.epoch = 0
        self.start = 0  # windows of `epoch` to skip on the next pass (set when resuming)
        self.seed = 0  # the loader's generator seed (nothing here is random)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        yield from range(start, self.windows)

    def __len__(self) -> int:
        return self.windows


def sliding_windows(
    tokens: Tensor, seq_len: int, stride: int, eos_id: int, ignore_index: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Windows of `seq_len` tokens advancing by `stride`; each scores only tokens not yet scored."""
    stream = torch.cat([torch.tensor([eos_id]), tokens.long()])
    inputs, targets = stream[:-1], stream[1:]
    total = len(targets)
    scored = 0  # targets [0, scored) already have a prediction
    begin = 0
    while scored < total:
        end = min(begin + seq_len, total)
        x = inputs.new_full((seq_len,), eos_id)
        y = targets.new_full((seq_len,), ignore_index)
        x[: end - begin] = inputs[begin:end]
        y[scored - begin : end - begin] = targets[scored:end]
        yield x, y
        scored = end
        begin += stride


def one_stream(
    tokens: Tensor, segment: int, context: int, eos_id: int, carried: bool
) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs, targets), each (1, T), in reading order; targets not scored are IGNORE_INDEX.

    `carried` (a model whose state carries from window to window, an LSTM):
    consecutive windows of `segment` tokens. Otherwise windows of `context`
    tokens advancing by `segment`, each scoring its newest `segment` (the first
    one all of its own), as `sliding_windows`.
    """
    if carried:
        windows = StreamWindows(tokens, 1, segment, pad_last=True, eos_id=eos_id)
        return (windows[i] for i in range(len(windows)))
    pairs = sliding_windows(tokens, context, segment, eos_id, IGNORE_INDEX)
    return ((x[None], y[None]) for x, y in pairs)
