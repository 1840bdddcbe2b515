"""`compile=auto`: compile where this machine's measured speed-up repays the compile within the run."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lmlab.budget import TimeBudget
from lmlab.compilation import (
    CACHE_FILE,
    MIN_RUN_SECONDS,
    CompileWherePays,
    Measurement,
    compile_pays,
    decide,
    measure,
)

from conftest import quiet_trainer, random_batches, tiny_gpt_module

# compiled steps at half the eager time, 10 s to compile: compiling does E seconds of eager
# work in 10 + E/2 seconds, which is MIN_GAIN (1.05) times sooner from E = 22.105 s on
HALF_TIME = Measurement(eager_step=1.0, compiled_step=0.5, compile_seconds=10.0)


def test_compiling_pays_from_the_run_length_where_the_compile_is_repaid_with_the_gain() -> None:
    assert not compile_pays(22.0, HALF_TIME)
    assert compile_pays(22.2, HALF_TIME)
    assert compile_pays(float("inf"), HALF_TIME)


def test_compiling_never_pays_where_compiled_steps_are_not_faster_enough() -> None:
    barely = Measurement(eager_step=1.0, compiled_step=0.96, compile_seconds=0.0)
    assert not compile_pays(1e9, barely)  # 1.04x faster, for free: below MIN_GAIN
    slower = Measurement(eager_step=1.0, compiled_step=1.2, compile_seconds=1.0)
    assert not compile_pays(float("inf"), slower)


def test_the_choice_says_why() -> None:
    short = decide(30.0, None)
    assert not short.compile and "too short to pay" in short.reason
    long = decide(3600.0, HALF_TIME, how="cached")
    assert long.compile
    assert (
        "compiled steps run at 2.00x eager here (cached: eager 1000.0 ms, compiled 500.0 ms a step"
        in long.reason
    )
    assert "compile 0:00:10" in long.reason
    slow = decide(20.0, HALF_TIME)
    assert not slow.compile and "would not gain 1.05x" in slow.reason


class _StopAfter(L.Callback):
    """Ends after `steps` optimizer steps a run that plans many more."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        trainer.should_stop = trainer.global_step >= self.steps


def _fit(
    module, tmp_path: Path, choice: CompileWherePays, *callbacks, steps: int = 3, plan: int = 3
) -> None:
    """Train `steps` steps of a run that plans `plan` (its length as compile=auto sees it)."""
    torch.manual_seed(1)  # the same dropout masks for every run (tiny_gpt_module has dropout 0.1)
    callbacks = [choice, *callbacks, _StopAfter(steps)]
    trainer = quiet_trainer(tmp_path, callbacks, max_steps=plan, accelerator="cpu")
    trainer.fit(module, random_batches(steps, vocab=32, seed=0))


def test_a_short_run_stays_eager_without_measuring_the_compile(tmp_path: Path) -> None:
    choice = CompileWherePays(tmp_path / "cache")
    _fit(tiny_gpt_module(32, 1e-3), tmp_path, choice)
    assert choice.choice is not None and not choice.choice.compile
    assert "too short to pay" in choice.choice.reason
    assert not (tmp_path / "cache" / CACHE_FILE).exists()  # nothing measured, nothing cached


def test_a_budget_never_lengthens_a_run_past_its_steps(tmp_path: Path) -> None:
    choice = CompileWherePays(tmp_path / "cache")
    _fit(tiny_gpt_module(32, 1e-3), tmp_path, choice, TimeBudget(seconds=10 * MIN_RUN_SECONDS))
    assert not choice.choice.compile and "too short to pay" in choice.choice.reason
    assert not (tmp_path / "cache" / CACHE_FILE).exists()  # 3 steps: nothing measured


def test_a_family_that_does_not_compile_is_never_measured(tmp_path: Path) -> None:
    module = tiny_gpt_module(32, 1e-3)
    module.model.compiles = False  # what the LSTM declares
    choice = CompileWherePays(tmp_path / "cache")
    _fit(module, tmp_path, choice, TimeBudget(seconds=10 * MIN_RUN_SECONDS))
    assert not choice.choice.compile
    assert choice.choice.reason == "the gpt family does not compile to one graph"


@pytest.mark.parametrize(
    "compiled",
    [False, pytest.param(True, marks=pytest.mark.slow)],  # a compile of a tiny model: ~5 s
    ids=["eager", "compiled"],
)
def test_measuring_leaves_the_model_as_it_was_and_copies_no_weight(
    compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tiny_gpt_module(32, 1e-3)
    model = module.model.train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    batch = next(iter(random_batches(1, vocab=32, seed=0)))  # a DataLoader draws a seed
    rng = torch.random.get_rng_state()
    # A copy of a weight would hold it twice at the run's first step (its peak, for a
    # large vocabulary): every step runs on the model's own tensors.
    for kind in (torch.Tensor, torch.nn.Parameter):
        monkeypatch.setattr(kind, "__deepcopy__", lambda *_: pytest.fail("a tensor was copied"))

    measured = measure(model, batch, contextlib.nullcontext, compiled=compiled)
    monkeypatch.undo()

    assert measured.eager_step > 0 and measured.compiled_step > 0
    assert (measured.compiled_step == measured.eager_step) != compiled
    assert all(p.grad is None for p in model.parameters())  # no gradient left for step 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert torch.equal(torch.random.get_rng_state(), rng)  # dropout drew from a forked RNG
    traced = []
    model.blocks[0].register_forward_pre_hook(
        lambda *_: traced.append(torch.compiler.is_compiling())
    )
    model(*batch)
    assert traced == [False]  # the model itself stays eager


@pytest.mark.slow  # two compiles of a tiny model: about 10 s on 2 CPU cores
def test_a_long_run_measures_once_caches_and_measuring_changes_nothing_it_computes(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    long_run = TimeBudget(seconds=10 * MIN_RUN_SECONDS)  # planned length: the budget
    plan = 10**9  # steps: the budget is the shorter
    first, second = CompileWherePays(cache), CompileWherePays(cache)
    measured_run, cached_run = tiny_gpt_module(32, 1e-2), tiny_gpt_module(32, 1e-2)
    keys = list(measured_run.state_dict())
    _fit(measured_run, tmp_path / "a", first, long_run, plan=plan)
    stored = json.loads((cache / CACHE_FILE).read_text())
    assert len(stored) == 1
    [(key, values)] = stored.items()
    assert f"torch {torch.__version__}" in key and "batch 4x8" in key
    assert set(values) == {"eager_step", "compiled_step", "compile_seconds"}
    assert "measured:" in first.choice.reason

    _fit(cached_run, tmp_path / "b", second, TimeBudget(seconds=10 * MIN_RUN_SECONDS), plan=plan)
    assert "cached:" in second.choice.reason
    assert second.choice.compile == first.choice.compile
    assert list(measured_run.state_dict()) == keys  # compiled in place: clean checkpoint keys
    for name, tensor in cached_run.state_dict().items():
        assert torch.equal(measured_run.state_dict()[name], tensor), name  # same RNG, same steps
