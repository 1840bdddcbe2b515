"""A run folder holds exactly one run: claimed before Hydra writes into it, locked while in use.

`RunFolderGuard` is a Hydra callback (conf/train.yaml). Its `on_run_start`
runs after the config is composed and before Hydra creates the folder or
writes `.hydra/` into it, so a refusal leaves every file as it was:

- A folder named by the clock (the default `outputs/runs/${now:...}`) that
  another run took in the same second becomes `NAME_2`, `NAME_3`, ...: each
  name is claimed with an atomic `mkdir`, so two runs never share one.
- A new run (not `resume=`) into a folder that already holds a run stops with
  one line and exit 2; continue that run with `resume=`, or pick another folder.
  A requeued SLURM job (trainer=slurm) that finds its `hpc_ckpt_N.ckpt` there
  continues the run instead.
- A folder that cannot be created or written stops with one line naming it.
- A lock file, `lmlab.lock`, records the owner (pid, host, start time, command).
  A second process finding a live owner stops with one line; a lock whose owner
  is gone (the run was killed) is reported and taken over, atomically, so two
  processes racing for it cannot both win. The lock goes when the run ends.

`on_multirun_start` does the same for a sweep's folder. A folder named by the
clock gets its own name; a named one may be reused by a resumable search
(`hparams_search=...`, whose jobs continue the study) but not by a grid sweep,
whose job folders 0, 1, ... would overwrite the earlier sweep's.

Processes that join a run someone else started (DDP ranks started by Lightning,
torchrun or SLURM, and a sweep job's own fresh `train.py`) write into the
folder their rank 0 holds, so they skip all of this. Ranks after the first that
torchrun or srun started (on this node or another) write nothing there at all:
`further_rank_argv` turns off their `.hydra/` and their log file, which Hydra
would otherwise write in every process (Lightning gives the processes it starts
such overrides itself).
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from lmlab.errors import UserError, report_user_errors

LOCK_FILE = "lmlab.lock"
# How the run ended (lmlab.result writes it); its status of a run that did not complete.
RESULT_FILE, FAILED = "result.json", "failed"
# What a folder that holds a run has (Hydra's record, checkpoints, lmlab's record).
RUN_MARKERS = (".hydra", "checkpoints", "metrics.jsonl", RESULT_FILE, "summary.json")
# Set for every process of a run but its first: they use the folder rank 0 holds.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
# Set by launchers that start every process themselves (torchrun, srun), not by Lightning.
LAUNCHER_RANK_VARIABLES = ("RANK", "SLURM_PROCID")
# What a further rank started by such a launcher adds to its command line: no .hydra/ and
# log lines on its own console only, so rank 0 alone writes into the shared run folder.
FURTHER_RANK_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=stdout")
SWEEP_DIR_ENV = "LMLAB_SWEEP_DIR"  # set for a sweep job run in fresh processes (lmlab.distributed)
RESUMABLE_SWEEPERS = ("hydra_plugins.lmlab_sweepers.optuna_search.OptunaSearch",)


def joins_another_process() -> bool:
    """Whether this process is a further rank of a run (or sweep job) another process holds."""
    return bool(os.environ.get(SWEEP_DIR_ENV)) or _any_rank_above_zero(RANK_VARIABLES)


def _any_rank_above_zero(names: tuple[str, ...]) -> bool:
    for name in names:
        value = os.environ.get(name, "0")
        if value.isdigit() and int(value) != 0:
            return True
    return False


def requeued_slurm_job(folder: Path) -> bool:
    """Whether this is a SLURM job that was requeued (trainer=slurm) to continue the run in `folder`.

    SLURM counts requeues in SLURM_RESTART_COUNT; the run stopped with an
    `hpc_ckpt_N.ckpt` there, which Lightning continues from.
    """
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return restarts.isdigit() and int(restarts) > 0 and any(folder.glob("hpc_ckpt_*.ckpt"))


def launched_as_further_rank() -> bool:
    """Whether torchrun or srun started this process as a rank other than 0."""
    return _any_rank_above_zero(LAUNCHER_RANK_VARIABLES)


def further_rank_argv(argv: list[str]) -> list[str]:
    """`argv` with FURTHER_RANK_OVERRIDES for a further rank started by torchrun or srun.

    The same settings given on the command line are replaced, not repeated
    (Hydra refuses a key set twice).
    """
    if not launched_as_further_rank():
        return argv
    keys = {o.partition("=")[0] for o in FURTHER_RANK_OVERRIDES}
    kept = [a for a in argv[1:] if a.lstrip("+~").partition("=")[0] not in keys]
    return [argv[0], *kept, *FURTHER_RANK_OVERRIDES]


def refused_before_training(folder: Path, holds: list[str]) -> bool:
    """Whether `folder` holds only what a run stopped by bad input leaves (`.hydra` and a failed
    `result.json`; no checkpoint, record or summary): a new run may take the folder, where
    otherwise neither a new run nor `resume=` (nothing to resume) could use it."""
    if RESULT_FILE not in holds or not set(holds) <= {".hydra", RESULT_FILE}:
        return False
    try:
        result = json.loads((folder / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and result.get("status") == FAILED


class RunFolderGuard(Callback):
    """Hydra callback: claim and lock the run (or sweep) folder before anything is written."""

    def __init__(self) -> None:
        self.lock: RunLock | None = None

    @report_user_errors
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if joins_another_process():
            return
        resuming = OmegaConf.select(config, "resume") is not None
        folder = self._claim(config, "hydra.run.dir", resuming=resuming)
        if not resuming:
            holds = [name for name in RUN_MARKERS if (folder / name).exists()]
            if refused_before_training(folder, holds):
                print(
                    f"run folder {folder} holds only a run refused before training "
                    "(result.json: failed); this run takes its place",
                    file=sys.stderr,
                    flush=True,
                )
            elif holds and not requeued_slurm_job(folder):
                raise UserError(
                    f"run folder {folder} already holds a run ({', '.join(holds)}); continue "
                    f"it with resume={folder}, or give the new run another hydra.run.dir"
                )

    @report_user_errors
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if joins_another_process():
            return
        folder = self._claim(config, "hydra.sweep.dir", resuming=False)
        resumable = OmegaConf.select(config, "hydra.sweeper._target_") in RESUMABLE_SWEEPERS
        jobs = [p.parent for p in folder.glob("*/.hydra")]
        if jobs and not resumable:
            raise UserError(
                f"sweep folder {folder} already holds jobs of an earlier sweep "
                f"({', '.join(sorted(p.name for p in jobs)[:5])}); give this sweep another "
                "hydra.sweep.dir"
            )

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _claim(self, config: DictConfig, key: str, resuming: bool) -> Path:
        """Create (or choose) the folder `key` names, lock it, and write the choice back."""
        folder = Path(str(OmegaConf.select(config, key)))
        named_by_clock = "${now:" in str(_unresolved(config, key))
        if named_by_clock and not resuming:
            folder = claim_new_folder(folder)
            _set(config, key, str(folder))
        else:
            make_folder(folder)
        self.lock = RunLock.acquire(folder)
        return folder


def _unresolved(config: DictConfig, key: str) -> Any:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(config, parent)
    return OmegaConf.to_container(node, resolve=False).get(leaf)


def _set(config: DictConfig, key: str, value: str) -> None:
    """Set a Hydra key for this process and for every job config composed from it."""
    with read_write(config.hydra), open_dict(config.hydra):
        OmegaConf.update(config, key, value)
        # Sweep jobs are composed again from the master config's Hydra overrides.
        config.hydra.overrides.hydra.append(f"{key}={_quote(value)}")


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"run folder {folder} cannot be created: {error.strerror or error}; choose another "
            "place with hydra.run.dir=... (or hydra.sweep.dir=... for -m)"
        ) from None
    if not folder.is_dir():
        raise UserError(f"run folder {folder} is a file; choose another hydra.run.dir")


def claim_new_folder(folder: Path) -> Path:
    """`folder`, or the first free `folder_2`, `folder_3`, ...: created here, so nobody else has it."""
    make_folder(folder.parent)
    for number in range(1, 10_000):
        candidate = folder if number == 1 else folder.with_name(f"{folder.name}_{number}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as error:
            raise UserError(
                f"run folder {candidate} cannot be created: {error.strerror or error}; choose "
                "another place with hydra.run.dir=..."
            ) from None
    raise UserError(f"every name from {folder} to {folder}_9999 is taken; clean up {folder.parent}")


class RunLock:
    """`lmlab.lock` in a run folder: who holds it, released at exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.owner = _owner()
        atexit.register(self.release)

    @classmethod
    def acquire(cls, folder: Path) -> RunLock:
        path = folder / LOCK_FILE
        for _ in range(5):
            if _create(path, cls._record()):
                return cls(path)
            holder = _read(path)
            if holder is None:  # being written this instant, or damaged: look once more
                time.sleep(0.1)
                holder = _read(path) or {}
            if holder and _alive(holder):
                raise UserError(
                    f"run folder {folder} is in use by process {holder.get('pid')} on "
                    f"{holder.get('host')} (since {holder.get('started')}); wait for it to "
                    "finish or stop it, or choose another folder"
                )
            # The owner is gone: move its lock aside (only one racer can) and take over.
            stale = path.with_name(f"{LOCK_FILE}.stale-{secrets.token_hex(4)}")
            try:
                os.replace(path, stale)
            except FileNotFoundError:
                continue  # someone else took it over first: look again
            if (_read(stale) or {}) != holder:  # a new owner's lock arrived meanwhile: put it back
                os.replace(stale, path)
                continue
            stale.unlink(missing_ok=True)
            owner = f"process {holder.get('pid')} on {holder.get('host')}" if holder else "nobody"
            print(
                f"warning: {folder} was locked by {owner}, which is gone (the run was "
                "killed?); taking the lock over",
                file=sys.stderr,
                flush=True,
            )
        raise UserError(f"could not lock run folder {folder}: other processes keep taking it")

    @staticmethod
    def _record() -> bytes:
        record = {
            **_owner(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        return json.dumps(record).encode()

    def release(self) -> None:
        holder = _read(self.path)
        if holder is not None and _same_owner(holder, self.owner):
            self.path.unlink(missing_ok=True)


def _create(path: Path, content: bytes) -> bool:
    """Create `path` holding `content` if it does not exist; False if it does."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError as error:
        raise UserError(
            f"run folder {path.parent} is not writable: {error.strerror or error}; choose "
            "another place with hydra.run.dir=..."
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    return True


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "process_start": _process_start(pid)}


def _same_owner(record: dict, owner: dict) -> bool:
    return all(record.get(key) == owner[key] for key in ("pid", "host", "process_start"))


def _process_start(pid: int) -> str | None:
    """When `pid` started (Linux: clock ticks since boot), so a reused pid is not mistaken."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22, counted after the command name


def _alive(record: dict) -> bool:
    """Whether the lock's owner still runs; on another host we cannot tell, so assume it does."""
    if record.get("host") != socket.gethostname():
        return True
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    started = record.get("process_start")
    return started is None or started == _process_start(pid)
