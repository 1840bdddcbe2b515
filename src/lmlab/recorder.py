"""`RunRecorder`: the callback that keeps the run's own record (`metrics.jsonl`, `plots/curves.png`).

Global rank 0 writes; every rank counts tokens, so a resumed run continues
the count on any rank. The file format is `lmlab.record`'s.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lmlab.plot import plot_curves
from lmlab.record import METRICS_FILE, append_records, load_curves

PLOT_FILE = "plots/curves.png"


def _fitting(trainer: L.Trainer) -> bool:
    return trainer.state.fn == "fit" and not trainer.sanity_checking


def _batch_tokens(batch: Any) -> int:
    """Tokens in a batch, from its shape only: no device sync."""
    inputs = batch[0] if isinstance(batch, tuple | list) else batch
    return inputs.numel() if isinstance(inputs, Tensor) else 0


class RunRecorder(Callback):
    """Count tokens, record the curves of a run in `metrics.jsonl`, plot them at the end.

    One JSON object per line, `kind` says which:
    `{"kind": "train", "step", "epoch", "tokens", "time_s", "train/loss", "train/lr"}`
    per optimizer step (every `every_n_steps`), `{"kind": "val", "step", ...,
    "val/ppl", "val/loss"}` per validation, and at the end of fitting
    `{"kind": "best", "monitor", "score", "checkpoint"}` from the checkpoint
    callback. `step` counts optimizer steps done (the checkpoint's
    `global_step`); `tokens` counts input tokens of all processes so far.

    Losses stay on the device until the next validation or the end of fitting,
    which read them back in one transfer: no per-step sync. Tokens come from
    batch shapes. Throughput (`tokens_per_s`) excludes validation and sampling
    time. The token count and training time travel in checkpoints, so a resumed
    run continues them; a run resumed in the same folder appends to its
    record (records past the resumed step are superseded when read).
    """

    def __init__(
        self, dirpath: str, every_n_steps: int = 1, plot: bool = True, window: int = 50
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.plot = plot
        self.tokens_seen = 0
        self.train_time_s = 0.0
        self.fit_started: float | None = None
        self._clock: float | None = None  # start of the current stretch of training
        self._lr: float | None = None
        self._step_losses: list[Tensor] = []
        self._pending: list[tuple[dict[str, Any], Tensor | None]] = []
        self._last_step = -1
        self._recent: deque[tuple[float, int, int]] = deque(maxlen=max(2, window))
        self._restores = True  # does loading a checkpoint's state continue this record

    @property
    def metrics_path(self) -> Path:
        return self.dirpath / METRICS_FILE

    @property
    def plot_path(self) -> Path:
        return self.dirpath / PLOT_FILE

    # -- state carried by checkpoints -----------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen, "train_time_s": self._train_time()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Only a resumed fit continues the counts: trainer.test(ckpt_path=best) after fitting
        # would otherwise rewind them to the best checkpoint's step.
        if not self._restores:
            return
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))
        self.train_time_s = float(state_dict.get("train_time_s", 0.0))

    # -- clocks ---------------------------------------------------------------

    def _train_time(self) -> float:
        running = 0.0 if self._clock is None else time.perf_counter() - self._clock
        return self.train_time_s + running

    def _pause_clock(self) -> None:
        if self._clock is not None:
            self.train_time_s += time.perf_counter() - self._clock
            self._clock = None

    def _start_clock(self) -> None:
        self._clock = time.perf_counter()
        self._recent.clear()  # the recent rate measures training only

    def recent_tokens_per_s(self) -> float | None:
        """Tokens per second over the last `window` steps, None until two steps are seen."""
        if len(self._recent) < 2:
            return None
        (t0, tokens0, _), (t1, tokens1, _) = self._recent[0], self._recent[-1]
        return (tokens1 - tokens0) / (t1 - t0) if t1 > t0 else None

    def recent_seconds_per_step(self) -> float | None:
        if len(self._recent) < 2:
            return None
        (t0, _, step0), (t1, _, step1) = self._recent[0], self._recent[-1]
        return (t1 - t0) / (step1 - step0) if step1 > step0 else None

    # -- hooks ----------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restores = stage == "fit"  # Lightning restores callback state after setup

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_started = time.perf_counter()
        self._last_step = trainer.global_step
        if trainer.is_global_zero and trainer.ckpt_path is None:
            # A fresh run starts a fresh record; a resumed one appends to it.
            self.metrics_path.unlink(missing_ok=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._start_clock()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._clock is None:  # back from validation (and sampling)
            self._start_clock()
        if trainer.optimizers:
            # The LR this step uses: the scheduler steps before on_train_batch_end.
            self._lr = float(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.tokens_seen += _batch_tokens(batch) * trainer.world_size
        if not trainer.is_global_zero:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            # Lightning divides the loss by accumulate_grad_batches; undo it.
            self._step_losses.append(loss.detach().float() * trainer.accumulate_grad_batches)
        step = trainer.global_step
        if step == self._last_step:  # accumulating: the optimizer has not stepped yet
            return
        self._last_step = step
        self._recent.append((time.perf_counter(), self.tokens_seen, step))
        if step % self.every_n_steps == 0:
            record = {
                "kind": "train",
                "step": step,
                "epoch": trainer.current_epoch,
                "tokens": self.tokens_seen,
                "time_s": round(self._train_time(), 3),
                "train/lr": self._lr,
            }
            loss_mean = torch.stack(self._step_losses).mean() if self._step_losses else None
            self._pending.append((record, loss_mean))
        self._step_losses = []

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _fitting(trainer):
            self._pause_clock()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not _fitting(trainer):
            return
        if trainer.is_global_zero:
            record = {
                "kind": "val",
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "tokens": self.tokens_seen,
                "time_s": round(self._train_time(), 3),
            }
            for name, value in trainer.callback_metrics.items():
                if name.startswith("val/"):
                    record[name] = float(value)  # one sync per validation
            self._pending.append((record, None))
            self._flush()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause_clock()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause_clock()
        if not trainer.is_global_zero:
            return
        checkpoint = trainer.checkpoint_callback
        score = getattr(checkpoint, "best_model_score", None)
        if score is not None and getattr(checkpoint, "monitor", None):
            record = {
                "kind": "best",
                "monitor": checkpoint.monitor,
                "score": float(score),
                "checkpoint": checkpoint.best_model_path,
            }
            self._pending.append((record, None))
        self._flush()
        if self.plot and self.metrics_path.is_file():
            try:
                plot_curves([load_curves(self.dirpath)], self.plot_path)
            except Exception as error:  # a figure is not worth losing a finished run over
                rank_zero_warn(f"could not draw {self.plot_path}: {error!r}")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if trainer.is_global_zero:
            self._flush()  # keep what was recorded before an interrupt or a crash

    def _flush(self) -> None:
        """Read the pending losses back in one transfer and append every record to the file."""
        if not self._pending:
            return
        losses = [loss for _, loss in self._pending if loss is not None]
        values = iter(torch.stack(losses).cpu().tolist() if losses else [])
        records = []
        for record, loss in self._pending:
            if loss is not None:
                record["train/loss"] = next(values)
            records.append(record)
        self._pending = []
        append_records(self.dirpath, records)
