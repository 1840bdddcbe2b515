"""Testing aid: callbacks that make a train.py run fail on purpose at a chosen step, or record it.

Tests add them to a run as config nodes, never through the environment, so a
real run neither loads nor reads any of this:

    fault_overrides("sigkill", 5)   # ++callbacks.fault._target_=faults.Fault ...
    record_overrides(path)          # ++callbacks.record._target_=faults.Recorder ...

`conftest.run_entry_point` and `forkserver.ForkServer` put tests/ on the
child's PYTHONPATH, so Hydra finds `faults.Fault`. A resumed run keeps the
stored config's nodes: pass `fault_overrides(None)` to switch a fault off.

Fault kinds, steps counted from 1 (optimizer steps):
    sigkill      SIGKILL the process right before step STEP + 1 starts (after
                 step STEP, its validation and its checkpoints)
    sigstop      SIGSTOP the process at the same point: it stays, frozen, answering
                 nothing (a node that hangs or lost its network)
    sigterm      send SIGTERM to the process during step STEP
    sigint       send SIGINT to the process during step STEP
    sigusr1      send SIGUSR1 to the process during step STEP (SLURM's warning
                 before the time limit)
    kill_in_save SIGKILL the process while it writes the first checkpoint at or
                 after step STEP (its temporary file exists, unfinished)
    nan          make the weights NaN before step STEP, so its loss is NaN

`Recorder(path)` appends `train STEP LOSS` after every training step and
`val STEP PPL` after every validation, floats written exactly (repr).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch

KINDS = ("sigkill", "sigstop", "sigterm", "sigint", "sigusr1", "kill_in_save", "nan")


def fault_overrides(kind: str | None, step: int = 0, rank: int | None = None) -> list[str]:
    """The train.py overrides that add (or, with None, switch off) a fault.

    With `rank`, only that process of a several-process run fails (every rank
    has the same config, so the others run the same callback and do nothing).
    """
    if kind is None:
        return ["++callbacks.fault=null"]
    return [
        "++callbacks.fault._target_=faults.Fault",
        f"++callbacks.fault.kind='{kind}'",  # quoted: Hydra reads a bare nan as a float
        f"++callbacks.fault.step={step}",
        *([f"++callbacks.fault.rank={rank}"] if rank is not None else []),
    ]


def record_overrides(path: Path) -> list[str]:
    """The train.py overrides that record every training loss and val/ppl into `path`."""
    return ["++callbacks.record._target_=faults.Recorder", f"++callbacks.record.path='{path}'"]


def read_records(path: Path) -> dict[tuple[str, int], float]:
    """`Recorder` lines; a step replayed after a kill must repeat its value exactly."""
    values: dict[tuple[str, int], float] = {}
    for line in path.read_text().splitlines():
        kind, step, value = line.split()
        key = (kind, int(step))
        assert values.get(key, float(value)) == float(value), f"replayed {key} differs"
        values[key] = float(value)
    return values


class Recorder(L.Callback):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _write(self, line: str) -> None:
        with self.path.open("a") as f:
            f.write(line + "\n")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, *args) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._write(f"train {trainer.global_step} {float(loss)!r}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking and "val/ppl" in trainer.callback_metrics:
            self._write(f"val {trainer.global_step} {float(trainer.callback_metrics['val/ppl'])!r}")


SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigusr1": signal.SIGUSR1}


class _KillWhenPickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


class Fault(L.Callback):
    def __init__(self, kind: str, step: int, rank: int | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"a fault is one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.step = step
        self.rank = rank

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, *args) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        done = trainer.global_step  # steps finished before this one
        if self.kind in ("sigkill", "sigstop") and done == self.step:
            os.kill(os.getpid(), signal.SIGKILL if self.kind == "sigkill" else signal.SIGSTOP)
        if done + 1 == self.step and self.kind in SIGNALS:
            os.kill(os.getpid(), SIGNALS[self.kind])
        if done + 1 == self.step and self.kind == "nan":
            with torch.no_grad():
                for param in pl_module.parameters():
                    param.fill_(float("nan"))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict) -> None:
        if self.kind == "kill_in_save" and trainer.global_step >= self.step:
            checkpoint["~kill"] = _KillWhenPickled()  # torch.save dies pickling it
