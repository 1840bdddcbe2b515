"""A time budget sizes the schedule to the steps that fit, and the run ends with it.

The trainer, model, schedule and checkpoints are real; only the clock is a
counter that each training step and validation batch moves forward, so the
tests know exactly how long everything "took".
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lmlab.budget import TimeBudget
from lmlab.schedules import epoch_decay, resize, warmup_cosine

from conftest import quiet_trainer, random_batches, tiny_gpt_module

VOCAB = 40
LR = 1e-2


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Ticks(Callback):
    """Moves the clock on by `step` seconds per training step and `val` per validation batch."""

    def __init__(self, clock: Clock, step: float, val: float) -> None:
        self.clock, self.step, self.val = clock, step, val

    def on_train_batch_end(self, *args) -> None:
        self.clock.now += self.step

    def on_validation_batch_end(self, *args) -> None:
        self.clock.now += self.val


class LastLR(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(callbacks: list[Callback], tmp_path: Path, epochs: int = 4, ckpt: Path | None = None):
    """Fit a tiny GPT with a warm-up cosine for `epochs` of 50 steps; the trainer and its LRs."""
    schedule = functools.partial(warmup_cosine, warmup_steps=2, min_lr_ratio=0.1)
    module = tiny_gpt_module(VOCAB, LR, schedule)
    lrs = LastLR()
    trainer = quiet_trainer(tmp_path, [*callbacks, lrs], max_epochs=epochs, num_sanity_val_steps=0)
    trainer.fit(module, random_batches(50, VOCAB, 0), random_batches(10, VOCAB, 1), ckpt_path=ckpt)
    return trainer, lrs.lrs


def test_the_schedule_ends_when_the_budget_does(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lmlab.budget")
    clock = Clock()
    # 4 epochs of 50 steps would take 200 s of steps and 4 x 5 s of validation.
    budget = TimeBudget(seconds=100, measure_after=5, measure_steps=10, margin=1.0, clock=clock)
    trainer, lrs = _fit([Ticks(clock, step=1.0, val=0.5), budget], tmp_path)
    planned = budget.total_steps
    assert planned is not None and planned < 200  # the epochs allowed more
    assert trainer.global_step == planned  # it stopped where it planned to
    # inside the budget, final validation included, and less than a step short of it
    assert clock.now <= 100 + 1e-9
    assert clock.now > 100 - 1.0 - 5.0
    # the cosine reached its floor at the last step: the schedule finished, not cut
    assert lrs[-1] == pytest.approx(0.1 * LR, rel=1e-3)
    assert budget.step_seconds == pytest.approx(1.0)
    assert budget.validation_seconds == pytest.approx(5.0)
    # the first plan, made before any validation ran, says its validation time is a guess
    plans = [r.getMessage() for r in caplog.records if "schedule sized" in r.getMessage()]
    assert "a validation (estimated)" in plans[0]
    assert "0:00:05 a validation (measured)" in plans[-1]


class SlowingTicks(Ticks):
    """As `Ticks`, but steps take 30% longer from step `after` on (the first steps were fast)."""

    def __init__(self, clock: Clock, step: float, val: float, after: int) -> None:
        super().__init__(clock, step, val)
        self.after = after

    def on_train_batch_end(self, trainer, *args) -> None:
        self.clock.now += self.step * (1.3 if trainer.global_step > self.after else 1.0)


def test_the_plan_follows_steps_that_slow_down_after_the_first_measurement(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lmlab.budget")
    clock = Clock()
    # Measured at 1.0 s a step over steps 5 to 15; from step 20 on a step takes 1.3 s. A plan
    # kept from the first measurement would run about 25 s past the budget.
    budget = TimeBudget(seconds=120, measure_after=5, measure_steps=10, margin=1.0, clock=clock)
    trainer, lrs = _fit([SlowingTicks(clock, step=1.0, val=0.5, after=20), budget], tmp_path)
    plans = [r.getMessage() for r in caplog.records if "schedule sized" in r.getMessage()]
    assert "1000.0 ms a step" in plans[0]
    assert trainer.global_step == budget.total_steps < 200
    assert clock.now <= 120 + 1e-9  # inside the budget, the last validation included
    assert clock.now > 120 - 1.3 - 5.0  # and less than a step and a validation short of it
    assert lrs[-1] == pytest.approx(0.1 * LR, rel=1e-3)  # the cosine ended at its floor
    assert 1.0 < budget.step_seconds < 1.3  # the mean over every step since step 5


def test_a_fast_machine_ends_with_its_epochs_inside_the_budget(tmp_path):
    clock = Clock()
    budget = TimeBudget(seconds=1000, measure_after=5, measure_steps=10, clock=clock)
    trainer, lrs = _fit([Ticks(clock, step=1.0, val=0.5), budget], tmp_path, epochs=2)
    assert budget.total_steps == trainer.global_step == 100
    assert clock.now < 1000


def test_no_budget_changes_nothing(tmp_path):
    clock = Clock()
    budget = TimeBudget(seconds=None, clock=clock)
    trainer, lrs = _fit([Ticks(clock, step=1.0, val=0.5), budget], tmp_path, epochs=2)
    assert budget.total_steps is None
    assert trainer.global_step == 100


def test_a_resumed_run_keeps_the_plan_it_saved(tmp_path):
    clock = Clock()
    budget = TimeBudget(seconds=100, measure_after=5, measure_steps=10, margin=1.0, clock=clock)

    class Interrupt(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 30:
                trainer.should_stop = True

    # the first part: planned at step 15, stopped at 30
    first, _ = _fit([Ticks(clock, step=1.0, val=0.5), budget, Interrupt()], tmp_path)
    planned = budget.total_steps
    path = tmp_path / "part1.ckpt"
    first.save_checkpoint(path)
    # the second part runs 10x slower: a new plan would be far shorter
    clock2 = Clock()
    budget2 = TimeBudget(seconds=100, measure_after=5, measure_steps=10, margin=1.0, clock=clock2)
    second, lrs = _fit([Ticks(clock2, step=10.0, val=5.0), budget2], tmp_path, ckpt=path)
    assert budget2.total_steps == planned
    assert second.global_step == planned
    scheduler = second.lr_scheduler_configs[0].scheduler
    assert scheduler.lr_lambdas[0].total_steps == planned
    assert lrs[-1] == pytest.approx(0.1 * LR, rel=1e-3)


def test_resize_changes_the_length_of_every_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = warmup_cosine(optimizer, total_steps=100, warmup_steps=0, min_lr_ratio=0.0)
    assert resize(cosine, 50)
    assert cosine.lr_lambdas[0](50) == pytest.approx(0.0, abs=1e-12)
    assert cosine.lr_lambdas[0](25) == pytest.approx(0.5)
    decay = epoch_decay(optimizer, total_steps=100, epochs=4, decay_after=2, factor=0.5)
    assert resize(decay, 40)  # now 10 steps an epoch
    assert [decay.lr_lambdas[0](s) for s in (9, 10, 20, 30)] == [1.0, 1.0, 0.5, 0.25]
    assert resize(decay, 41)  # the one step past 4 whole epochs belongs to the last
    assert decay.lr_lambdas[0](40) == 0.25
    plain = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    assert not resize(plain, 10)  # a schedule with no length is left alone


def test_the_sized_schedule_survives_the_schedulers_state_dict():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = warmup_cosine(optimizer, total_steps=100, warmup_steps=0, min_lr_ratio=0.0)
    resize(cosine, 37)
    fresh = warmup_cosine(optimizer, total_steps=100, warmup_steps=0, min_lr_ratio=0.0)
    fresh.load_state_dict(cosine.state_dict())
    assert fresh.lr_lambdas[0].total_steps == 37
    assert math.isclose(fresh.lr_lambdas[0](37), 0.0, abs_tol=1e-12)
