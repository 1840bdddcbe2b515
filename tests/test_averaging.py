"""`averaging=ema`: the saved weights are the exponential moving average of the trained ones."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lmlab.averaging import EMA

from conftest import quiet_trainer, random_batches, tiny_gpt_module

VOCAB = 40


class Weights(Callback):
    """The module's weights after every optimizer step."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after_step.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


class SaveAfter(Callback):
    """A checkpoint after optimizer step `step`, as ModelCheckpoint writes one during fitting."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("decay", [0.5, 0.9])
def test_the_average_is_the_hand_computed_ema_of_three_steps(tmp_path, decay):
    weights = Weights()
    callbacks = [weights, EMA(decay=decay), SaveAfter(3, tmp_path / "step3.ckpt")]
    trainer = quiet_trainer(tmp_path, callbacks, max_steps=3, limit_val_batches=0)
    trainer.fit(tiny_gpt_module(VOCAB, lr=1e-2), random_batches(3, VOCAB, 0))
    saved = torch.load(tmp_path / "step3.ckpt", weights_only=True)
    w1, w2, w3 = weights.after_step
    for name, value in saved["state_dict"].items():
        if not value.is_floating_point():
            continue
        # torch's AveragedModel starts from the first step's weights, then decays towards each
        expected = w1[name]
        for later in (w2[name], w3[name]):
            expected = decay * expected + (1 - decay) * later
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(saved["state_dict"][k], w3[k]) for k in w3)
    # the weights being trained are saved too, as they were after step 3
    assert all(torch.equal(saved["current_model_state"][k], w3[k]) for k in w3)


def test_a_decay_outside_0_1_is_refused():
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"averaging decay must be in \(0, 1\)"):
            EMA(decay=decay)
