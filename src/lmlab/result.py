"""The outcome of one training run: `result.json`, written by every run, sweep job or not.

`record_result` wraps the training steps: status (completed or failed), best
val/ppl, test/ppl, steps, wall time, overrides and the error's one line. In a
sweep (`-m`) a job that raises, or whose val/ppl is not finite (the loss
diverged), is recorded as failed and returns NaN, so the other jobs still run;
outside sweeps errors propagate: one line for a bad value, a traceback for a
bug. `lmlab.sweep` reads these files back into the sweep's summary.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lmlab.atomic import write_atomically
from lmlab.checks import is_number
from lmlab.errors import UserError, find_user_error
from lmlab.run_folder import FAILED, RESULT_FILE

log = logging.getLogger(__name__)

COMPLETED, MISSING = "completed", "missing"


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_result(train: Callable[[DictConfig], dict[str, Any]]) -> Callable[[DictConfig], float]:
    """Run one job, write its `result.json`, return its best val/ppl (NaN if it failed).

    `train(cfg)` returns `best_val_ppl`, `test_ppl`, `steps` and `best_checkpoint`.
    In a sweep, a job that needs several processes started by Lightning runs as
    a fresh `train.py` in its folder (see `lmlab.distributed`).
    """

    @functools.wraps(train)
    def run(cfg: DictConfig) -> float:
        # Imported here: reading and writing result.json (the sweep summary does) needs
        # neither Lightning nor the distributed launch.
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        from lmlab import distributed

        start = time.monotonic()
        output_dir = Path(cfg.paths.output_dir)
        sweeping = in_sweep()
        result: dict[str, Any] = {"status": FAILED, "error": None}
        ok = False
        try:
            if sweeping:
                distributed.share_cores_with_parallel_jobs()
            if sweeping and distributed.sweep_job_needs_fresh_processes(cfg.trainer):
                (output_dir / RESULT_FILE).unlink(missing_ok=True)
                code = distributed.run_in_fresh_processes(output_dir)
                result.update(read_result(output_dir) or {})
                ok = result["status"] == COMPLETED and code == 0
                if not ok and not result["error"]:
                    result["error"] = f"train.py exited with code {code}"
            else:
                result.update(train(cfg))
                best = result.get("best_val_ppl")
                ok = best is None or is_number(best)  # None: no validation ran
                if not ok:
                    result["error"] = (
                        f"best val/ppl is {result.get('best_val_ppl')}: training diverged "
                        "(non-finite loss); try a lower optimizer.lr"
                    )
        except distributed.SweepSetupError:
            raise  # a sweep that cannot work stops before any job trains
        except Exception as error:
            result["error"] = _describe(error)
            if not sweeping:
                _finish(output_dir, result, start, ok=False)
                raise
            if isinstance(find_user_error(error), UserError):
                log.error("job failed: %s", result["error"])
            else:
                log.error("job failed:\n%s", traceback.format_exc())
        _finish(output_dir, result, start, ok=ok)
        if not ok and not sweeping and rank_zero_only.rank == 0:
            raise UserError(result["error"] or "the run failed")
        return (
            float(result["best_val_ppl"]) if ok and is_number(result["best_val_ppl"]) else math.nan
        )

    return run


def _finish(output_dir: Path, result: dict[str, Any], start: float, ok: bool) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from lmlab import loggers

    loggers.finish_wandb(ok)
    result["status"] = COMPLETED if ok else FAILED
    result["wall_time_s"] = round(time.monotonic() - start, 3)
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra is not None:
        result["overrides"] = list(hydra.overrides.task)
        if hydra.mode == RunMode.MULTIRUN:
            result["job"] = hydra.job.num
    result["output_dir"] = str(output_dir)
    if rank_zero_only.rank == 0:
        write_result(output_dir, result)


def write_result(output_dir: Path, result: dict[str, Any]) -> None:
    clean = {
        k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in result.items()
    }
    write_atomically(output_dir / RESULT_FILE, json.dumps(clean, indent=2) + "\n")


def read_result(folder: Path) -> dict[str, Any] | None:
    path = folder / RESULT_FILE
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    for key in ("best_val_ppl", "test_ppl"):
        if result.get(key) is None:
            result[key] = math.nan
    return result


def _describe(error: BaseException) -> str:
    user_error = find_user_error(error)
    text = str(user_error) if user_error is not None else f"{type(error).__name__}: {error}"
    first_line = next((line for line in text.splitlines() if line.strip()), text)
    return first_line.strip()[:500]
