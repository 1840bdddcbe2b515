"""`OptunaSearch`: a resumable Optuna search as a Hydra sweeper, on Optuna's public API only.

    python train.py -m hparams_search=ptb_optuna

Each trial is an ordinary job of the sweep (job folder N holds trial N, with
its own `result.json`); the study lives in the configured storage (SQLite in
the search folder by default). The sweeper asks Optuna for parameters
(`study.ask`), launches the batch through Hydra's launcher, and tells Optuna
each job's value (`study.tell`). Compared with hydra-optuna-sweeper, which
speaks only Optuna 2:

- `n_trials` is the size of the study, not of one invocation: run the same
  command again after an interruption and only the missing trials run. Trials
  an interruption left RUNNING are told FAIL and not counted, so run one search
  process per study at a time.
- A trial whose job returns NaN or inf (lmlab's failed or diverged jobs) is told
  FAIL and the search goes on.
- The sampler (any `optuna.samplers` class, configured with `_target_`) is
  seeded with `seed + the number of trials so far`, so a resumed seeded search
  draws fresh values instead of repeating its first trials'.

The search space, `params`, takes Hydra's sweep syntax: `choice(a, b)`,
`interval(low, high)` (integers give an integer distribution), `tag(log,
interval(low, high))` for a log scale, and `range(start, stop, step)`. Sweep
values given on the command line join it; plain values there are fixed for
every trial.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

OUTCOME = "lmlab:outcome"  # user attribute of every trial this sweeper finished itself


class OptunaSearch(Sweeper):
    def __init__(
        self,
        study_name: str,
        storage: str | None,
        n_trials: int,
        direction: str | Sequence[str] = "minimize",
        n_jobs: int = 1,
        sampler: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(n_trials, int) or n_trials < 1:
            raise ValueError(f"hydra.sweeper.n_trials must be a positive integer, got {n_trials!r}")
        if not isinstance(n_jobs, int) or n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_jobs must be a positive integer, got {n_jobs!r}")
        self.study_name = study_name
        self.storage = storage
        self.n_trials = n_trials
        self.directions = [direction] if isinstance(direction, str) else list(direction)
        self.n_jobs = n_jobs
        self.sampler = sampler
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")
        import optuna
        from optuna.trial import TrialState

        logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines, every search
        assert self.config is not None and self.launcher is not None
        space, fixed = search_space([f"{k}={v}" for k, v in self.params.items()] + arguments)
        folder = _sqlite_folder(self.storage)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

        earlier = _trials_so_far(self.study_name, self.storage)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=self._make_sampler(earlier),
            directions=self.directions,
            load_if_exists=True,
        )
        trials = study.get_trials(deepcopy=False)
        done = sum(1 for t in trials if t.state.is_finished() and OUTCOME in t.user_attrs)
        stale = [t for t in trials if t.state == TrialState.RUNNING]
        for trial in stale:  # left behind by an interrupted search
            study.tell(trial.number, state=TrialState.FAIL)
        remaining = max(0, self.n_trials - done)
        log.info(
            f"Study {study.study_name} in {self.storage}: {done} finished trials"
            + (f", {len(stale)} interrupted (marked FAIL)" if stale else "")
            + f"; running {remaining} more of n_trials={self.n_trials}"
        )

        while remaining > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, remaining))]
            batch = [[*fixed, *(f"{k}={v!r}" for k, v in t.params.items())] for t in trials]
            self.validate_batch_is_legal(batch)
            returns = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            for trial, ret in zip(trials, returns, strict=True):
                values = _job_values(ret, len(self.directions))
                trial.set_user_attr(OUTCOME, "failed" if values is None else "completed")
                if values is None:
                    study.tell(trial, state=TrialState.FAIL)
                    log.warning(f"Trial {trial.number} failed: {trial.params}")
                    if ret.status == JobStatus.FAILED:
                        _ = ret.return_value  # a job that raised past train.py: stop, as Hydra does
                else:
                    study.tell(trial, values)
            remaining -= len(trials)
        self._write_results(study)

    def _make_sampler(self, trials_so_far: int) -> Any:
        import optuna

        if not self.sampler:
            return optuna.samplers.TPESampler()
        node = OmegaConf.create(dict(self.sampler))
        seed = node.get("seed")
        if seed is not None:
            node.seed = (int(seed) + trials_so_far) % 2**32
        return instantiate(node)

    def _write_results(self, study: Any) -> None:
        from optuna.trial import TrialState

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name}
        if complete and len(self.directions) == 1:
            best = study.best_trial
            results.update(best_params=best.params, best_value=best.value, best_trial=best.number)
            log.info(f"Best trial {best.number}: value {best.value}, parameters {best.params}")
        elif complete:
            results["solutions"] = [
                {"params": t.params, "values": t.values} for t in study.best_trials
            ]
        else:
            log.warning("No trial completed")
        assert self.config is not None
        OmegaConf.save(
            OmegaConf.create(results),
            Path(self.config.hydra.sweep.dir) / "optimization_results.yaml",
        )


def search_space(overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Optuna distributions for the sweep overrides, and the plain overrides kept fixed.

    A later override of a key replaces an earlier one (the command line wins
    over the config's `params`).
    """
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if not override.is_sweep_override():
            fixed[key] = override.input_line
            continue
        value = override.value()
        if isinstance(value, ChoiceSweep | RangeSweep):
            choices = override.sweep_iterator(transformer=Transformer.identity)
            space[key] = CategoricalDistribution(list(choices))
        elif isinstance(value, IntervalSweep):
            log_scale = "log" in value.tags
            low, high = value.start, value.end
            if isinstance(low, int) and isinstance(high, int):
                space[key] = IntDistribution(low, high, log=log_scale)
            else:
                space[key] = FloatDistribution(float(low), float(high), log=log_scale)
        else:
            raise ValueError(f"{override.input_line}: Optuna cannot search this kind of sweep")
    return space, list(fixed.values())


def _trials_so_far(study_name: str, storage: str | None) -> int:
    """How many trials the study already has (0 for a new study or in-memory storage)."""
    import optuna

    if storage is None:
        return 0
    folder = _sqlite_folder(storage)
    if folder is not None and not Path(storage[len("sqlite:///") :]).is_file():
        return 0  # reading would create the file
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    return next((s.n_trials for s in summaries if s.study_name == study_name), 0)


def _sqlite_folder(storage: Any) -> Path | None:
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        return Path(storage[len("sqlite:///") :]).parent
    return None


def _job_values(ret: Any, n_objectives: int) -> list[float] | None:
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
