"""A run ends with a validation, whichever limit ends it.

Lightning validates every `val_check_interval` batches, but a run can end between
two of those: at `trainer.max_steps` mid-epoch, or at the last epoch's end when
the interval does not divide the epoch (`val_check_interval=5` of 12 batches,
or `0.5` of 11). It then ends without validating its last steps: no `best.ckpt`
where none ran before, no validation perplexity for the summary or a sweep, and
a test of weights nothing scored. Asking Lightning to stop at the last step
(`trainer.should_stop`) makes it validate there first, the way early stopping
and the time budget (lmlab.budget) end a run; where a validation was due at that
step anyway, it runs once.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class ValidateAtEnd(Callback):
    """Stops the run at its last step (`trainer.max_steps`, or the last batch of
    `trainer.max_epochs`), so that Lightning validates there."""

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if last_step(trainer, batch_idx):
            trainer.should_stop = True


def last_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the training batch `batch_idx` just ended the run's last optimizer step."""
    # -1: no step limit. global_step counts optimizer steps, so with gradient
    # accumulation this is the last batch of the last step's window.
    if 0 <= trainer.max_steps <= trainer.global_step:
        return True
    last_epoch = (
        trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1
    )
    # num_training_batches is inf for a dataset of unknown length: its end is not known here
    return last_epoch and batch_idx + 1 >= trainer.num_training_batches
