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
    sigterm      send SIGTERM to the process during step STEP
    sigint       send SIGINT to the process during step STEP
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

KINDS = ("sigkill", "sigterm", "sigint", "kill_in_save", "nan")


def fault_overrides(kind: str | None, step: int = 0) -> list[str]:
    """The train.py overrides that add (or, with None, switch off) a fault."""
    if kind is None:
        return ["++callbacks.fault=null"]
    return [
        "++callbacks.fault._target_=faults.Fault",
        f"++callbacks.fault.kind='{kind}'",  # quoted: Hydra reads a bare nan as a float
        f"++callbacks.fault.step={step}",
    ]


def record_overrides(path: Path) -> list[str]:
    """The train.py overrides that record every training loss and val/ppl into `path`."""
    return ["++callbacks.record._target_=faults.Recorder", f"++callbacks.record.path='{path}'"]


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


class _KillWhenPickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


class Fault(L.Callback):
    def __init__(self, kind: str, step: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"a fault is one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, *args) -> None:
        done = trainer.global_step  # steps finished before this one
        if self.kind == "sigkill" and done == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
        if done + 1 == self.step and self.kind in ("sigterm", "sigint"):
            os.kill(os.getpid(), signal.SIGTERM if self.kind == "sigterm" else signal.SIGINT)
        if done + 1 == self.step and self.kind == "nan":
            with torch.no_grad():
                for param in pl_module.parameters():
                    param.fill_(float("nan"))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict) -> None:
        if self.kind == "kill_in_save" and trainer.global_step >= self.step:
            checkpoint["~kill"] = _KillWhenPickled()  # torch.save dies pickling it
