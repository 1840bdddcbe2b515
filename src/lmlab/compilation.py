"""`compile=auto`: torch.compile the model's blocks where it pays back, eager where it does not.

Compiling costs tens of seconds once per run and is repaid only by faster steps,
and how much faster depends on the machine, the precision and the model's
shapes: the issue that asked for this measured `small` in bf16-mixed at 1.54x
eager on an AVX-512 BF16 EPYC, where an fp32-only Xeon gains far less. So `auto`
decides per run:

1. A model family that does not compile to one graph (`compiles = False`: the
   LSTM, whose oneDNN kernel dynamo leaves to eager) runs eager.
2. The run's length: its time budget (`callbacks.budget.seconds`), else its
   planned optimizer steps at the measured eager speed (a few forward and
   backward passes of the model, milliseconds for a test model). A run shorter
   than `MIN_RUN_SECONDS` runs eager without measuring anything more.
3. A measurement at the run's batch shape and precision: training steps
   (forward and backward) of the model eager and compiled as a run compiles it
   (each block: `lmlab.models.interface.compile_blocks`), and the compile's own
   time. It is cached in `compile.json` in the data cache folder, keyed by CPU
   (or GPU) model, torch version, thread count, precision and shapes, so it is
   paid once per machine and shape.
4. Compile when the compiled run does the eager run's work at least
   `MIN_GAIN` times sooner, compile time included (a time budget: when the
   steps it then fits are at least `MIN_GAIN` times as many).

The decision is made before the first training step, on that step's batch
(its shape, device and dtype). The measured steps run inside
`torch.random.fork_rng` and change no weight, so measuring never changes what
the run computes: a run that measured and one that read the cache train alike.
Global rank 0 decides and every rank follows. Sharded strategies (FSDP) run
eager under `auto`. `compile=true` or `false` is always used as given.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

from lmlab.budget import TimeBudget
from lmlab.humanize import format_duration
from lmlab.machine_cache import MachineCache, machine_key
from lmlab.models.interface import compile_blocks

log = logging.getLogger(__name__)

AUTO = "auto"
CACHE_FILE = "compile.json"
MIN_RUN_SECONDS = 120.0  # below this, a compile (tens of seconds) could not pay back
MIN_GAIN = 1.05  # compiled must finish the run's work at least this many times sooner
WARMUP_STEPS = 2  # eager: first-call set-up; compiled: the compile itself
TIMED_STEPS = 5


@dataclass(frozen=True)
class Measurement:
    """Seconds per training step (forward and backward) eager and compiled; the compile's cost."""

    eager_step: float
    compiled_step: float
    compile_seconds: float


@dataclass(frozen=True)
class CompileChoice:
    """Whether the run compiles, and why, for train.log."""

    compile: bool
    reason: str


def compile_pays(eager_seconds: float, measured: Measurement) -> bool:
    """Whether compiling does `eager_seconds` of eager steps' work `MIN_GAIN` times sooner."""
    if math.isinf(eager_seconds):  # no end: the compile's cost vanishes, the step rate decides
        return measured.compiled_step * MIN_GAIN <= measured.eager_step
    compiled_seconds = measured.compile_seconds + eager_seconds * (
        measured.compiled_step / measured.eager_step
    )
    return compiled_seconds * MIN_GAIN <= eager_seconds


def decide(
    eager_seconds: float, measured: Measurement | None, how: str = "measured"
) -> CompileChoice:
    """The choice for a run of `eager_seconds` of eager steps, given this machine's measurement.

    `measured` None: the run is too short to be worth measuring (`MIN_RUN_SECONDS`).
    """
    length = (
        f"a run of about {format_duration(eager_seconds)} of eager steps"
        if math.isfinite(eager_seconds)
        else "a run with no end set"
    )
    if measured is None:
        return CompileChoice(
            False, f"{length}: shorter than {format_duration(MIN_RUN_SECONDS)}, too short to pay"
        )
    speedup = measured.eager_step / measured.compiled_step
    facts = (
        f"compiled steps run at {speedup:.2f}x eager here ({how}: "
        f"eager {measured.eager_step * 1e3:.1f} ms, compiled {measured.compiled_step * 1e3:.1f} "
        f"ms a step, compile {format_duration(measured.compile_seconds)})"
    )
    if compile_pays(eager_seconds, measured):
        return CompileChoice(True, f"{facts}; {length} finishes sooner compiled")
    return CompileChoice(False, f"{facts}; {length} would not gain {MIN_GAIN}x compiled")


def time_steps(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    autocast: Callable[[], AbstractContextManager[Any]],
    warmup: int = WARMUP_STEPS,
    steps: int = TIMED_STEPS,
) -> tuple[float, float]:
    """(seconds the `warmup` steps took in all, median seconds of the `steps` after them)."""
    idx, targets = batch

    def step() -> float:
        start = time.perf_counter()
        with autocast():
            loss = model(idx, targets=targets)
        loss.backward()
        if loss.device.type == "cuda":
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    warm = sum(step() for _ in range(warmup))
    return warm, statistics.median(step() for _ in range(steps))


def measure(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    autocast: Callable[[], AbstractContextManager[Any]],
    compiled: bool,
) -> Measurement:
    """Training steps of `model` eager, and with `compiled` compiled as a run compiles it too.

    `model` ends as it began: no step changes a weight (there is no optimizer
    step), each step's gradients are dropped, and dropout draws from a forked RNG,
    so the run computes what it would have without the measurement. Both run on
    `model`'s own weights, not on a copy of them, which would hold them twice at
    the run's first step (250 MiB more for `small` at a 250,000-word vocabulary,
    the run's peak): the compiled steps run on a copy of the modules that shares
    every parameter and buffer, so `model` itself stays eager. Called before the
    first training step, when no gradient is held.
    """
    devices = [batch[0].device] if batch[0].device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # dropout draws no run's numbers
        _, eager = time_steps(model, batch, autocast)
        if not compiled:
            return Measurement(eager, eager, 0.0)
        tensors = [*model.parameters(), *model.buffers()]
        trial = copy.deepcopy(model, memo={id(t): t for t in tensors})  # the same tensors
        compile_blocks(trial)
        warm, fast = time_steps(trial, batch, autocast)
    return Measurement(eager, fast, max(0.0, warm - WARMUP_STEPS * fast))


def read_measurements(cache: MachineCache) -> dict[str, Measurement]:
    """The cached measurements; entries that do not read as one are left out (measured again)."""
    known = {}
    for key, value in cache.read().items():
        try:
            known[key] = Measurement(**value)
        except TypeError:
            continue
    return known


class CompileWherePays(Callback):
    """`compile=auto`: before the first training step, compile the model in place where it pays."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache = MachineCache(cache_dir, CACHE_FILE)
        self.choice: CompileChoice | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.choice is not None:
            return
        inputs, targets = batch[0], batch[1]
        choice = (
            self.choose(trainer, pl_module, (inputs, targets)) if trainer.is_global_zero else None
        )
        self.choice = trainer.strategy.broadcast(choice, src=0)
        log.info("compile %s: %s", str(self.choice.compile).lower(), self.choice.reason)
        if self.choice.compile:
            compile_blocks(pl_module.model)  # in place: state_dict keys stay clean

    def choose(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: tuple[torch.Tensor, torch.Tensor],
    ) -> CompileChoice:
        model = pl_module.model
        if not getattr(model, "compiles", True):
            family = model.config.family
            return CompileChoice(False, f"the {family} family does not compile to one graph")
        if type(trainer.strategy) not in (SingleDeviceStrategy, DDPStrategy):
            name = type(trainer.strategy).__name__
            return CompileChoice(False, f"{name}: auto compiles single-device and DDP runs only")
        autocast = trainer.precision_plugin.forward_context
        # "per block": what is compiled is part of what was measured (a whole-model compile,
        # measured before 2026-12-08, is another speed)
        shape = f"{describe(model)} | batch {'x'.join(map(str, batch[0].shape))} | per block"
        key = machine_key(str(trainer.precision), shape, device=batch[0].device)
        measured, how = read_measurements(self.cache).get(key), "cached"
        if measured is None:
            eager_step = measure(model, batch, autocast, compiled=False).eager_step
        else:
            eager_step = measured.eager_step
        seconds = planned_seconds(trainer, eager_step)
        if seconds < MIN_RUN_SECONDS:
            return decide(seconds, None)
        if measured is None:
            log.info("compile auto: measuring eager and compiled steps once for %s", key)
            measured, how = measure(model, batch, autocast, compiled=True), "measured"
            self.cache.store(key, asdict(measured))
        return decide(seconds, measured, how)


def planned_seconds(trainer: L.Trainer, eager_step: float) -> float:
    """The run's length: its planned steps at the eager speed, or its time budget if shorter.

    A budget only ever cuts a run: `experiment=ptb_5min trainer.max_steps=2` is two steps long.
    """
    steps = float(trainer.estimated_stepping_batches)  # inf where neither steps nor epochs end
    seconds = steps * eager_step * trainer.accumulate_grad_batches
    for callback in trainer.callbacks:
        if isinstance(callback, TimeBudget) and callback.seconds is not None:
            seconds = min(seconds, callback.seconds)
    return seconds


def describe(model: nn.Module) -> str:
    """The model's config as one line: family and every number that shapes its graph."""
    config = model.config.to_dict()
    return " ".join(f"{k}={v}" for k, v in sorted(config.items()))
