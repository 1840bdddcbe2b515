"""A split's token ids in its cached `.npy` file, read by position, never mapped.

A memory-mapped split keeps every page a batch has touched in the process's
resident memory: shuffled blocks touch the whole file within a fraction of an
epoch, so a process reading WikiText-103's 400 MB store grows by 400 MB
(measured: 10% of an epoch's batches brought all of it in, readahead
included; `benchmarks/data_speed.py --synthetic-words`). `TokenFile` reads
only the runs of ids a batch asks for with `os.preadv`: the pages stay in the
kernel's page cache, shared by every DDP rank and loader worker and given
back under memory pressure, and the process holds nothing of the split but
the batch in hand.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import numpy as np

# Positions closer than this many ids are read in one run (the ids between them are read
# and dropped): one read of 4 KiB costs about as much as one of a few bytes.
RUN_GAP = 1024


class TokenFile:
    """`ids[index]`, `len(ids)` and `np.asarray(ids)` of a 1-D `.npy` file, read with `os.preadv`.

    `index`: an integer array of any shape (the result has its shape) or a slice.
    Safe to share with forked loader workers (a read does not move the file's
    offset) and picklable for spawned ones (a copy reopens the file by path).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)  # ValueError where it is no .npy file
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            self.offset = f.tell()
            size = os.fstat(f.fileno()).st_size
        if len(shape) != 1 or dtype.kind not in "iu":
            raise ValueError(f"{self.path} does not hold a 1-D array of token ids")
        self.dtype = dtype
        self.length = shape[0]
        if size < self.offset + self.nbytes:
            raise ValueError(f"{self.path} ends before its {self.length} token ids")
        self._fd = os.open(self.path, os.O_RDONLY)
        # Closed when the object goes, or at exit before modules are torn down (a __del__
        # run at interpreter shutdown could find `os` already gone).
        weakref.finalize(self, os.close, self._fd)

    def __len__(self) -> int:
        return self.length

    @property
    def shape(self) -> tuple[int]:
        return (self.length,)

    @property
    def nbytes(self) -> int:
        return self.length * self.dtype.itemsize

    def __getitem__(self, index: np.ndarray | slice) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.length)
            return self._read(start, max(start, stop))[::step]
        index = np.asarray(index)
        if index.dtype.kind not in "iu":
            raise TypeError(f"token ids are indexed by integers, got {index.dtype}")
        flat = np.where(index < 0, index + self.length, index).ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= self.length):
            raise IndexError(f"index out of range for {self.length} token ids")
        if not flat.size:
            return np.empty(index.shape, dtype=self.dtype)
        rows = flat.reshape(-1, index.shape[-1] if index.ndim else 1)
        if (np.diff(rows, axis=1) == 1).all():  # a batch of windows: each row one run
            out = np.empty(rows.shape, dtype=self.dtype)
            for row, first in zip(out, rows[:, 0].tolist()):
                self._read_into(row, first)
            return out.reshape(index.shape)
        # Any other index: the sorted positions in runs (a new run where the gap exceeds
        # RUN_GAP), each run read into its place in one buffer, then every position taken.
        wanted = np.sort(flat)
        breaks = np.flatnonzero(np.diff(wanted) > RUN_GAP) + 1
        firsts = wanted[np.r_[0, breaks]]
        lengths = wanted[np.r_[breaks - 1, -1]] - firsts + 1
        bases = np.cumsum(lengths) - lengths
        buffer = np.empty(int(lengths.sum()), dtype=self.dtype)
        for first, length, base in zip(firsts.tolist(), lengths.tolist(), bases.tolist()):
            self._read_into(buffer[base : base + length], first)
        run = np.searchsorted(firsts, flat, side="right") - 1
        return buffer[bases[run] + flat - firsts[run]].reshape(index.shape)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        ids = self._read(0, self.length)
        return ids if dtype is None else ids.astype(dtype, copy=False)

    def _read(self, start: int, stop: int) -> np.ndarray:
        """ids[start:stop], a new array."""
        ids = np.empty(stop - start, dtype=self.dtype)
        self._read_into(ids, start)
        return ids

    def _read_into(self, ids: np.ndarray, start: int) -> None:
        """Fills `ids` with ids[start:start + len(ids)]: `preadv`, again where the kernel gives less."""
        view = memoryview(ids).cast("B")
        position = self.offset + start * self.dtype.itemsize
        while view.nbytes:
            got = os.preadv(self._fd, [view], position)
            if got == 0:
                raise OSError(f"{self.path} ends before its {self.length} token ids")
            view, position = view[got:], position + got

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])
