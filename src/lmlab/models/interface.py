"""The one small interface every model family implements, and the checks their configs share.

A family is a config dataclass plus an `nn.Module` built from it (gpt.py,
llama.py, lstm.py; the registry is `lmlab.models`):

- The config is flat scalars, so it travels inside checkpoints as plain JSON:
  `family`, `vocab_size`, `block_size` (the training window) and the family's
  own numbers; `to_dict()` gives the constructor arguments back.
- The module's `forward(idx, targets=None, state=None, reduction="mean")` gives
  the logits (B, T, vocab) for token ids (B, T), or with `targets` the loss
  fused with the output layer (the mean; with `reduction="sum"` the summed
  negative log-likelihood and the number of scored targets). A `state`, made by
  `new_state`, holds what the model has read so far: `forward` continues from
  it and advances it in place.
- `forward` is `output(hidden_states(idx, state), targets, reduction)`:
  `hidden_states` gives the final hidden states (B, T, C) the output layer
  reads, and `output` applies it (logits, or the fused loss). The neural
  cache (`lmlab.neural_cache`) reads those states.
- `max_context` is the most positions the model can read at once (`gpt`: its
  positional table, `block_size`; None where nothing limits it: rotary
  positions, a recurrent state). A state's `capacity` is how many positions it
  holds (a KV cache's size; None for a recurrent state). `carries_state` says
  whether training in the contiguous data order hands the state of one window
  on to the next (truncated backpropagation through time). `needs_native_bf16`
  says that some kernel of the model has no bf16 path where the CPU lacks bf16
  instructions (oneDNN's LSTM fails there instead of emulating). `compiles` says
  whether torch.compile makes one graph of each of its `blocks` (`compile_blocks`),
  so `compile=auto` may measure it.

Decoding, beam search, evaluation, the LightningModule and export use only this,
so none of them asks which family it drives.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import Tensor

from lmlab.checks import is_positive_int, is_real

FAMILIES = ("gpt", "llama", "lstm")


class State(Protocol):
    """What a model has read so far: a KV cache (Transformers), hidden and cell states (LSTM)."""

    length: int  # positions read so far

    @property
    def batch_size(self) -> int: ...

    @property
    def capacity(self) -> int | None:
        """How many positions it holds; None: any number (a recurrent state)."""

    def reorder(self, index: Tensor, keep: int = 0) -> None:
        """Keep batch rows `index`, in that order (the beams that survive a step).

        `keep`: how many leading positions every row already shares with its source.
        """

    def reset(self) -> None:
        """Forget everything read; the next forward starts afresh."""


class CarriedState(State, Protocol):
    """A state that training carries from one window to the next (`carries_state`)."""

    def detach(self) -> None:
        """Cut the graph behind the state: backpropagation stops at the window's start."""

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


def compile_blocks(model: torch.nn.Module, **options: Any) -> None:
    """torch.compile each of `model.blocks` in place (torchtitan's way), not the whole model;
    a family without blocks (the LSTM, `compiles = False`) is compiled whole, as before.

    The embedding lookup and the output layer's chunked fused loss (lmlab.loss)
    stay eager. Compiled whole, the loss is traced into a graph that holds the
    batch's (B, T, vocab) logits: for `small` at a 250,000-word vocabulary a step
    peaked at 3,518 MiB compiled whole, 1,719 per block and 1,713 eager, and its
    first step took 34.6 s against 3.7 (`benchmarks/compile_memory.py`,
    2026-12-08, AMD EPYC family 26, 2 cores; benchmarks/results/
    compile_memory_cpu_2026-12-08.md). In place, so state_dict keys stay clean.
    """
    for part in getattr(model, "blocks", None) or [model]:
        part.compile(**options)


class LanguageModelNet(Protocol):
    config: Any
    max_context: int | None
    carries_state: bool
    needs_native_bf16: bool
    compiles: bool

    def __call__(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        state: State | None = None,
        reduction: str = "mean",
    ) -> Tensor | tuple[Tensor, Tensor]: ...

    def hidden_states(
        self, idx: Tensor, state: State | None = None, pad_mask: Tensor | None = None
    ) -> Tensor: ...

    def output(
        self, hidden: Tensor, targets: Tensor | None = None, reduction: str = "mean"
    ) -> Tensor | tuple[Tensor, Tensor]: ...

    def new_state(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> State: ...


def check_family(config: Any, family: str) -> None:
    if config.family not in FAMILIES:
        raise ValueError(
            f"model.family must be one of {', '.join(FAMILIES)}, got {config.family!r}; pick a "
            "family with model=NAME (e.g. model=small, model=llama_small, model=lstm_small)"
        )
    if config.family != family:
        raise ValueError(
            f"model.family is {config.family!r} but this is the {family} config; pick a family "
            f"with model=NAME (families: {', '.join(FAMILIES)})"
        )


def check_positive_ints(config: Any, names: Iterable[str]) -> None:
    for name in names:
        value = getattr(config, name)
        if not is_positive_int(value):
            raise ValueError(f"model.{name} must be a positive integer, got {value!r}")


def check_fractions(config: Any, names: Iterable[str]) -> None:
    """Each of `names` in [0, 1) (a dropout probability), or None where the field allows it."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not (is_real(value) and 0.0 <= value < 1.0):
            raise ValueError(f"model.{name} must be in [0, 1), got {value!r}")
