"""The search loop of `ResumableOptunaSweeper` (imported only when a search runs)."""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")  # optuna 2 predates SQLAlchemy 2

import numpy as np  # noqa: E402
import optuna  # noqa: E402
from hydra.core.utils import JobStatus  # noqa: E402
from hydra_plugins.hydra_optuna_sweeper._impl import (  # noqa: E402
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from omegaconf import OmegaConf  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

log = logging.getLogger(__name__)
logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines would show in every search

INTERRUPTED = "lmlab:interrupted"  # system attribute of trials an interruption left behind


def _sqlite_folder(storage: Any) -> Path | None:
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        return Path(storage[len("sqlite:///") :]).parent
    return None


def _fail_interrupted(study: optuna.Study) -> int:
    """Mark trials still RUNNING from an interrupted search as FAIL; return how many."""
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for trial in stale:
        study._storage.set_trial_system_attr(trial._trial_id, INTERRUPTED, True)
        study._storage.set_trial_state(trial._trial_id, TrialState.FAIL)
    return len(stale)


def _finished(study: optuna.Study) -> int:
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.state.is_finished() and not t.system_attrs.get(INTERRUPTED)
    )


def _advance_sampler(sampler: Any, n_existing: int) -> None:
    """Reseed a resumed search's sampler from its own seed and the trials so far.

    Seeded the same as the first time, it would otherwise suggest the first
    trials' values again.
    """
    for obj in (sampler, getattr(sampler, "_random_sampler", None)):
        rng = getattr(obj, "_rng", None)
        if isinstance(rng, np.random.RandomState):
            obj._rng = np.random.RandomState((int(rng.randint(2**31 - 1)) + n_existing) % 2**31)


def _trial_values(ret: Any, n_objectives: int) -> list[float] | None:
    """The job's finite objective values, or None for a failed job."""
    if ret.status != JobStatus.COMPLETED:
        return None
    value = ret.return_value
    values = list(value) if isinstance(value, list | tuple) else [value]
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    if len(values) != n_objectives or not all(math.isfinite(v) for v in values):
        return None
    return values


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        if isinstance(self.sampler, functools.partial):
            raise ValueError("GridSampler is not supported here; use hydra/sweeper=optuna")
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config() + list(arguments)
        distributions, fixed = create_params_from_overrides(params_conf)
        for name in fixed:
            distributions.pop(name, None)
        directions = self._get_directions()

        folder = _sqlite_folder(self.storage)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=self.sampler,
            directions=directions,
            load_if_exists=True,
        )
        interrupted = _fail_interrupted(study)
        done = _finished(study)
        if study.trials:
            _advance_sampler(self.sampler, len(study.trials))
        remaining = max(0, self.n_trials - done)
        log.info(
            f"Study {study.study_name} in {self.storage}: {done} finished trials"
            + (f", {interrupted} interrupted (marked FAIL)" if interrupted else "")
            + f"; running {remaining} more of n_trials={self.n_trials}"
        )

        while remaining > 0:
            batch = min(self.n_jobs, remaining)
            trials = [study.ask() for _ in range(batch)]
            overrides = self._configure_trials(trials, distributions, fixed)
            returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
            for trial, ret in zip(trials, returns, strict=True):
                values = _trial_values(ret, len(directions))
                if values is None:
                    study.tell(trial, state=TrialState.FAIL)
                    log.warning(f"Trial {trial.number} failed: {trial.params}")
                    if ret.status == JobStatus.FAILED:
                        _ = ret.return_value  # a job that raised past train.py: stop, as Hydra does
                else:
                    study.tell(trial, values=values)
            remaining -= batch

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name}
        if complete and len(directions) == 1:
            best = study.best_trial
            results.update(best_params=best.params, best_value=best.value, best_trial=best.number)
            log.info(f"Best trial {best.number}: value {best.value}, parameters {best.params}")
        elif complete:
            results["solutions"] = [
                {"params": t.params, "values": t.values} for t in study.best_trials
            ]
        else:
            log.warning("No trial completed")
        OmegaConf.save(
            OmegaConf.create(results),
            Path(self.config.hydra.sweep.dir) / "optimization_results.yaml",
        )
