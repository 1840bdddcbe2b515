"""A run that its step or epoch limit ends between two validations validates at its last step."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from lmlab.final_validation import ValidateAtEnd

from conftest import quiet_trainer, random_batches, tiny_gpt_module


class _Validations(L.Callback):
    """The optimizer step at which each validation (after the sanity check) ran."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


def _validations(
    tmp_path: Path, *callbacks: L.Callback, **options: object
) -> tuple[list[int], int]:
    """The steps validated at in a run of 12 training batches, and the steps it ran."""
    seen = _Validations()
    trainer = quiet_trainer(
        tmp_path, [*callbacks, seen], max_epochs=1, num_sanity_val_steps=0, **options
    )
    trainer.fit(
        tiny_gpt_module(32, 1e-3),
        random_batches(12, vocab=32, seed=0),
        random_batches(2, vocab=32, seed=1),
    )
    return seen.steps, trainer.global_step


def test_lightning_alone_ends_runs_without_validating_their_last_steps(tmp_path: Path) -> None:
    # what the callback is for: 3 of 12 batches, or all 12, validation due every 5
    assert _validations(tmp_path / "a", max_steps=3, val_check_interval=5) == ([], 3)
    assert _validations(tmp_path / "b", val_check_interval=5) == ([5, 10], 12)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (dict(max_steps=3, val_check_interval=5), ([3], 3)),
        (dict(max_steps=7, val_check_interval=5), ([5, 7], 7)),
        # due at the last step anyway: validated once there
        (dict(max_steps=5, val_check_interval=5), ([5], 5)),
        # two batches a step: the last step ends after the 6th batch
        (dict(max_steps=3, val_check_interval=8, accumulate_grad_batches=2), ([3], 3)),
        # the epoch limit: its last batch
        (dict(val_check_interval=5), ([5, 10, 12], 12)),
        (dict(val_check_interval=1.0), ([12], 12)),  # once, at the epoch's end, as before
    ],
)
def test_a_run_validates_at_its_last_step_once(
    tmp_path: Path, options: dict, expected: tuple[list[int], int]
) -> None:
    assert _validations(tmp_path, ValidateAtEnd(), **options) == expected
