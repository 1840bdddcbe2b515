"""An Optuna sweeper that resumes interrupted searches and survives failed trials.

Configured like hydra-optuna-sweeper's `optuna` sweeper (same keys), with
`hydra.sweeper._target_` pointing here; see conf/hparams_search/ptb_optuna.yaml.
Differences from the stock sweeper:

- `n_trials` is the size of the study, not of one invocation: run the same
  command again after an interruption and only the missing trials run. Trials
  an interruption left RUNNING are marked FAIL (and not counted), so run one
  search process per study at a time.
- A trial whose job returns NaN or inf (lmlab's failed or diverged jobs) is told
  FAIL and the search goes on; the stock sweeper stops at the first one.
- Job folder N holds trial N, also across resumptions.
- A seeded sampler draws fresh values after a resumption instead of repeating
  the first trials' values.
"""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class ResumableOptunaSweeper(OptunaSweeper):
    def __init__(self, **kwargs: Any) -> None:
        from ._resumable_optuna_impl import ResumableOptunaSweeperImpl

        self.sweeper = ResumableOptunaSweeperImpl(**kwargs)
