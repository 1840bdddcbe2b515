"""Testing aid: make a training run fail on purpose at a chosen step, and record it.

Tests drive `train.py` as a subprocess and steer it through environment
variables; real runs never set them, and without them this adds nothing.

LMLAB_FAULT=KIND@STEP, steps counted from 1 (optimizer steps):
    sigkill      SIGKILL the process right before step STEP + 1 starts (after
                 step STEP, its validation and its checkpoints)
    sigterm      send SIGTERM to the process during step STEP
    sigint       send SIGINT to the process during step STEP
    kill_in_save SIGKILL the process while it writes the first checkpoint at or
                 after step STEP (its temporary file exists, unfinished)
    nan          make the weights NaN before step STEP, so its loss is NaN

LMLAB_RECORD=PATH appends `train STEP LOSS` after every training step and
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


def fault_callbacks() -> list[L.Callback]:
    """The callbacks the environment asks for; none in real runs."""
    callbacks: list[L.Callback] = []
    if record := os.environ.get("LMLAB_RECORD"):
        callbacks.append(Recorder(Path(record)))
    if fault := os.environ.get("LMLAB_FAULT"):
        kind, _, step = fault.partition("@")
        if kind not in KINDS or not step.isdigit():
            raise ValueError(f"LMLAB_FAULT must be KIND@STEP with KIND in {KINDS}, got {fault!r}")
        callbacks.append(Fault(kind, int(step)))
    return callbacks


class Recorder(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

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
