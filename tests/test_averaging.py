"""`averaging=ema|swa`: the saved weights are the moving or the equal-weight average of the trained ones."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lmlab.averaging import EMA, SWA
from lmlab.errors import UserError

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


def floating(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if v.is_floating_point()}


@pytest.mark.parametrize(
    "swa, averaged",
    [
        (dict(start_step=1), (1, 2, 3)),  # steps 2, 3, 4 (0-based 1, 2, 3)
        (dict(start_fraction=0.5), (2, 3)),  # from half of the 4 steps the run plans
    ],
)
def test_swa_holds_the_equal_weight_average_from_its_start(tmp_path, swa, averaged):
    weights = Weights()
    saves = [SaveAfter(step, tmp_path / f"step{step}.ckpt") for step in (1, 4)]
    callbacks = [weights, SWA(**swa), *saves]
    trainer = quiet_trainer(tmp_path, callbacks, max_steps=4, limit_val_batches=0)
    trainer.fit(tiny_gpt_module(VOCAB, lr=1e-2), random_batches(4, VOCAB, 0))
    after = [floating(w) for w in weights.after_step]
    saved = torch.load(tmp_path / "step4.ckpt", weights_only=True)
    for name, value in floating(saved["state_dict"]).items():
        expected = sum(after[i][name] for i in averaged) / len(averaged)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(saved["current_model_state"][k], after[3][k]) for k in after[3])
    # before it starts there is no average: the checkpoint holds the weights being trained
    early = torch.load(tmp_path / "step1.ckpt", weights_only=True)
    assert "current_model_state" not in early
    assert all(torch.equal(early["state_dict"][k], after[0][k]) for k in after[0])


def test_swa_validates_the_trained_weights_until_it_starts(tmp_path):
    # validation every step; the average starts after step 3 of 4
    weights, validated = Weights(), ValidatedWeights()
    callbacks = [weights, validated, SWA(start_step=2)]
    trainer = quiet_trainer(
        tmp_path, callbacks, max_steps=4, val_check_interval=1, num_sanity_val_steps=0
    )
    batches = random_batches(4, VOCAB, 0)
    trainer.fit(tiny_gpt_module(VOCAB, lr=1e-2), batches, random_batches(1, VOCAB, 1))
    after = [floating(w) for w in weights.after_step]
    seen = [floating(w) for w in validated.weights]
    assert len(seen) == 4
    for step in (0, 1):  # the weights as trained
        assert all(torch.equal(seen[step][k], after[step][k]) for k in after[step])
    for step, averaged in ((2, (2,)), (3, (2, 3))):
        for name, value in seen[step].items():
            expected = sum(after[i][name] for i in averaged) / len(averaged)
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)


class ValidatedWeights(Callback):
    """The module's weights as each validation sees them."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_validation_batch_start(self, trainer, pl_module, *args) -> None:  # after the swap
        self.weights.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def test_swa_start_values_outside_their_range_are_refused():
    for fraction in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"averaging start_fraction must be in \[0, 1\)"):
            SWA(start_fraction=fraction)
    with pytest.raises(ValueError, match=r"averaging start_step must be an integer >= 0"):
        SWA(start_step=-1)


def test_swa_from_a_fraction_of_a_run_without_an_end_is_refused(tmp_path):
    trainer = quiet_trainer(tmp_path, [SWA(start_fraction=0.5)], max_epochs=-1, max_steps=-1)
    with pytest.raises(UserError, match=r"start_fraction needs a planned number of steps"):
        trainer.fit(tiny_gpt_module(VOCAB, lr=1e-2), random_batches(2, VOCAB, 0))
