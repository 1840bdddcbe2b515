"""Weight averaging: Lightning's exponential moving average, and what lmlab adds to it.

`averaging=ema` adds Lightning's `EMAWeightAveraging` (an `AveragedModel` of the
LightningModule, updated after every optimizer step). Lightning swaps the
average in for every validation and writes it as the checkpoint's
`state_dict` (the weights being trained go to `current_model_state`), so
`val/ppl`, the `best` checkpoint, `eval.py` and `generate.py` all see the
averaged weights, and `resume=` continues both copies exactly.

What lmlab changes: after fitting, `trainer.test(ckpt_path=best)` loads the
best checkpoint with the callback still present, and Lightning's callback then
loads `current_model_state`, testing the weights that were trained rather than
the average that was validated and saved. Outside fitting this callback leaves
the checkpoint's `state_dict`, the average, in place.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class EMA(EMAWeightAveraging):
    """Lightning's EMA of the weights (decay per optimizer step), also used by `trainer.test`."""

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"averaging decay must be in (0, 1), got {decay!r}")
        super().__init__(decay=decay, **kwargs)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # resume: both copies back
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
