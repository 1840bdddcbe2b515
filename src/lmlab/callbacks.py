"""Callbacks for what Lightning lacks in what a run shows: progress, parameters, model files.

- `ProgressBar` is Lightning's Rich bar with loss, val ppl, tokens/s and the
  run's step count and ETA.
- `ParameterSummary` prints the parameters per part (embeddings, attention,
  MLP, norms) at the start of fitting.
- `ModelFiles` writes `vocab.json` and `model_config.json` beside the
  checkpoints: readable copies of what every checkpoint carries.

The run's own record is `lmlab.recorder`; sample text is `lmlab.samples`.
Everything that writes files or prints runs on global rank 0 only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelSummary, RichProgressBar
from rich.console import Console

from lmlab.budget import planned_steps
from lmlab.checkpoint import write_model_files
from lmlab.humanize import format_duration, format_rate
from lmlab.parameters import parameter_table
from lmlab.recorder import RunRecorder

C = TypeVar("C", bound=Callback)


def find_callback(trainer: L.Trainer, kind: type[C]) -> C | None:
    """The trainer's first callback of type `kind`, or None."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)


class ProgressBar(RichProgressBar):
    """Lightning's Rich progress bar showing loss, val ppl, step/total, tokens/s and the ETA.

    Tokens/s and the ETA (of the remaining training steps, validation not
    counted) come from the trainer's `RunRecorder`, averaged over its recent
    steps; without one they are left out.
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        shown: dict[str, Any] = {}
        if "train/loss" in items:
            shown["loss"] = f"{items.pop('train/loss'):.3f}"
        if "val/ppl" in items:
            shown["val ppl"] = f"{items.pop('val/ppl'):.2f}"
        shown.update(items)
        total = planned_steps(trainer)
        has_total = isinstance(total, int) or float(total) < float("inf")
        shown["step"] = f"{trainer.global_step}/{int(total)}" if has_total else trainer.global_step
        recorder = find_callback(trainer, RunRecorder)
        if recorder is not None:
            rate = recorder.recent_tokens_per_s()
            if rate is not None:
                shown["tok/s"] = format_rate(rate)
            per_step = recorder.recent_seconds_per_step()
            if per_step is not None and has_total:
                shown["eta"] = format_duration(max(0, int(total) - trainer.global_step) * per_step)
        return shown


def progress_bar(enabled: bool = True) -> ProgressBar | None:
    """The progress bar, or None when `trainer.enable_progress_bar` is off (Lightning refuses both)."""
    return ProgressBar() if enabled else None


class ParameterSummary(ModelSummary):
    """At the start of fitting, a Rich table of the model's parameters per part.

    Replaces Lightning's layer summary (a `ModelSummary` subclass, so Lightning
    adds no other). Expects the LightningModule to hold the network as `.model`.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        Console().print(parameter_table(getattr(pl_module, "model", pl_module)))


def parameter_summary(enabled: bool = True) -> ParameterSummary | None:
    """The parameter table, or None when `trainer.enable_model_summary` is off."""
    return ParameterSummary() if enabled else None


class ModelFiles(Callback):
    """Readable copies of what every checkpoint carries (`checkpoint_metadata`), beside the checkpoints.

    `model_config.json` and `vocab.json` in `dirpath`, for people and tools without
    torch. Written when fitting starts, after `ModelCheckpoint` has looked at its
    folder: written earlier, they made Lightning warn that a fresh run's checkpoint
    folder is not empty.
    """

    def __init__(self, dirpath: str | Path, metadata: dict[str, Any]) -> None:
        self.dirpath = Path(dirpath)
        self.metadata = metadata

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            write_model_files(self.dirpath, self.metadata)
