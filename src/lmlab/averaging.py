"""Weight averaging: Lightning's weight-averaging callbacks, and what lmlab adds to them.

`averaging=ema` adds Lightning's `EMAWeightAveraging` (an `AveragedModel` of the
LightningModule, updated after every optimizer step); `averaging=swa` adds its
`WeightAveraging` with torch's equal-weight average (stochastic weight
averaging, `torch.optim.swa_utils.get_swa_multi_avg_fn`) of the weights after
every optimizer step from a start step on. Lightning swaps the average in for
every validation and writes it as the checkpoint's `state_dict` (the weights
being trained go to `current_model_state`), so `val/ppl`, the `best`
checkpoint, `eval.py` and `generate.py` all see the averaged weights, and
`resume=` continues both copies exactly.

What lmlab changes: after fitting, `trainer.test(ckpt_path=best)` loads the
best checkpoint with the callback still present, and Lightning's callback then
loads `current_model_state`, testing the weights that were trained rather than
the average that was validated and saved. Outside fitting these callbacks leave
the checkpoint's `state_dict`, the average, in place.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_swa_multi_avg_fn

from lmlab.budget import planned_steps
from lmlab.checks import is_int
from lmlab.errors import UserError


class _SavedAverage(WeightAveraging):
    """Both copies are loaded back only to continue fitting; a test scores the saved average."""

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # resume: both copies back
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class EMA(_SavedAverage, EMAWeightAveraging):
    """Lightning's EMA of the weights (decay per optimizer step), also used by `trainer.test`."""

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"averaging decay must be in (0, 1), got {decay!r}")
        super().__init__(decay=decay, **kwargs)


class SWA(_SavedAverage):
    """The equal-weight average of the weights after each optimizer step from a start step on.

    The average starts after optimizer step `start_step` + 1 (0-based, as
    Lightning's `should_update` counts), or, when that is None, at
    `start_fraction` of the steps the run plans (the time budget's plan where
    there is one). Until it starts there is no average: validation, checkpoints
    and the end of training use the weights being trained, as without
    averaging (Lightning's callback would otherwise validate the initial
    weights its `AveragedModel` was made from).
    """

    def __init__(
        self, start_fraction: float = 0.5, start_step: int | None = None, **kwargs: Any
    ) -> None:
        if not 0.0 <= start_fraction < 1.0:
            raise ValueError(f"averaging start_fraction must be in [0, 1), got {start_fraction!r}")
        if start_step is not None and not (is_int(start_step) and start_step >= 0):
            raise ValueError(
                f"averaging start_step must be an integer >= 0 or null, got {start_step!r}"
            )
        super().__init__(multi_avg_fn=get_swa_multi_avg_fn(), **kwargs)
        self.start_fraction, self.start_step = start_fraction, start_step
        self.started = False  # has the average taken in any weights yet
        self._trainer: L.Trainer | None = None

    def first_step(self, trainer: L.Trainer) -> int:
        """The 0-based index of the first optimizer step whose weights the average takes in."""
        if self.start_step is not None:
            return self.start_step
        return int(self.start_fraction * planned_steps(trainer))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start_step is None and math.isinf(planned_steps(trainer)):
            raise UserError(
                "averaging=swa: callbacks.averaging.start_fraction needs a planned number of "
                "steps, and this run has no limit; set trainer.max_steps, trainer.max_epochs or "
                "callbacks.averaging.start_step"
            )
        self._trainer = trainer  # should_update is asked without it

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None or self._trainer is None:  # per step only, never per epoch
            return False
        if step_idx >= self.first_step(self._trainer):
            self.started = True  # Lightning updates the average right after this answer
        return self.started

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.started:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.started:
            super().on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.started:
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.started:  # else the weights being trained are the checkpoint's, as they stand
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if "current_model_state" in checkpoint:  # saved after the average started
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "started": self.started}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.started = state_dict["started"]
