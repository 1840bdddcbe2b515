"""Continue a stopped run exactly: `python train.py resume=RUN_DIR` (or `resume=CKPT`).

The resumed run works in the same run folder, composes the config the run
was started with (RUN_DIR/.hydra/config.yaml, not today's conf/), applies the
overrides given on the resume command line on top, and restarts from the
last checkpoint. Lightning restores the weights, optimizer, schedules, loop
counters and the training loader's position (`data.BatchLoader`);
`ResumeState` restores every random number generator, so dropout masks continue
as if the run had never stopped.
"""

from __future__ import annotations

import functools
import logging
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lmlab.checkpoint import METADATA_KEY
from lmlab.errors import UserError, find_user_error
from lmlab.finetune import check_compatible
from lmlab.models import config_from_dict
from lmlab.run_folder import RESULT_FILE, joins_another_process

log = logging.getLogger(__name__)
T = TypeVar("T")

RESUME_KEY = "resume"  # the config key that holds the checkpoint to resume from
INIT_FROM_KEY = "init_from"  # a new run from trained weights (lmlab.finetune): not with resume
RESUME_STATE_KEY = "lmlab_resume"  # checkpoint["lmlab_resume"]: the state ResumeState restores
LAST = "last.ckpt"
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def resume_argv(argv: list[str]) -> list[str]:
    """Rewrite `train.py resume=X [overrides]` into the Hydra command line that continues X.

    Must run before `@hydra.main` composes the config: the run folder and the
    stored config are chosen here. Command lines without `resume=` come back
    unchanged.
    """
    program, args = argv[0], argv[1:]
    # `++resume=` is what this rewrite leaves: the further processes Lightning starts
    # (trainer.devices=2) re-run the rewritten command line, which must stay as it is
    ours = [a for a in args if a.partition("=")[0] in (RESUME_KEY, f"+{RESUME_KEY}")]
    if not ours:
        return argv
    if len(ours) > 1:
        raise UserError(f"give resume= once, got {' '.join(ours)}")
    value = ours[0].partition("=")[2]
    overrides = [a for a in args if a != ours[0]]
    if value in ("", "null"):
        return [program, *overrides]
    for arg in overrides:
        flag = arg.partition("=")[0]
        if flag.lstrip("+") == INIT_FROM_KEY and arg.partition("=")[2] not in ("", "null"):
            raise UserError(
                f"resume= continues a run with its own weights; {arg} starts a new run from "
                "other weights: give one of them"
            )
        if arg in ("-m", "--multirun") or flag in _CONFIG_FLAGS:
            raise UserError(f"resume= continues one stored run; it cannot be combined with {flag}")

    run_dir, checkpoint = locate(Path(value).expanduser())
    hydra_dir = run_dir / ".hydra"
    output_dir = _original_output_dir(run_dir)
    groups = _config_groups(hydra_dir)
    for arg in overrides:
        key = arg.lstrip("+~").partition("=")[0]
        if key in groups:
            raise UserError(
                f"resume= keeps the run's config groups: {arg} would swap the {key} group; "
                f"override single values instead (e.g. {key}.NAME=VALUE)"
            )
        if key.startswith("hydra.run.dir"):
            raise UserError(f"resume= writes into the run's own folder {run_dir}; drop {arg}")

    step = int(_load_stored_checkpoint(checkpoint).get("global_step", 0))
    job_name = _job_name(hydra_dir)
    if not joins_another_process():  # rank 0 keeps it; the other ranks write nothing
        _keep_previous_config(hydra_dir)
    shown = " ".join(overrides) if overrides else "none"
    print(
        f"resuming {run_dir} from {checkpoint.name} (step {step}); overrides: {shown}",
        flush=True,
    )
    return [
        program,
        "--config-dir",
        str(hydra_dir),
        "--config-name",
        "config",
        *overrides,
        f"hydra.run.dir={_quote(str(output_dir))}",
        # the stored config.yaml has no hydra node: keep the job's name (and its log file)
        *([f"hydra.job.name={_quote(job_name)}"] if job_name else []),
        f"++{RESUME_KEY}={_quote(str(checkpoint))}",
    ]


def locate(path: Path) -> tuple[Path, Path]:
    """The run folder and the checkpoint to continue from, for a run folder or a checkpoint."""
    if not path.exists():
        raise UserError(f"nothing to resume: {path} does not exist")
    if path.is_file():
        run_dir = next((p for p in path.resolve().parents if _is_run_dir(p)), None)
        if run_dir is None:
            raise UserError(
                f"cannot resume from {path}: no run folder (with .hydra/config.yaml) above it"
            )
        return run_dir, path.resolve()
    if not _is_run_dir(path):
        raise UserError(f"nothing to resume: {path} is not a run folder (no .hydra/config.yaml)")
    run_dir = path.resolve()
    candidates = [d / LAST for d in checkpoint_dirs(run_dir) if (d / LAST).is_file()]
    if not candidates:
        folders = ", ".join(str(d) for d in checkpoint_dirs(run_dir))
        raise UserError(
            f"nothing to resume in {run_dir}: no {LAST} in {folders} (the run stopped before "
            "its first checkpoint); start it again without resume="
        )
    return run_dir, max(candidates, key=lambda p: p.stat().st_mtime_ns)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The folders the run's ModelCheckpoint callbacks write to."""
    cfg = _read_stored(run_dir / ".hydra" / "config.yaml")
    if "paths" in cfg:
        cfg.paths.output_dir = str(_original_output_dir(run_dir))
    folders = []
    for node in (cfg.get("callbacks") or {}).values():
        if node is None or not str(node.get("_target_", "")).endswith("ModelCheckpoint"):
            continue
        try:
            dirpath = node.get("dirpath")
        except Exception:  # an interpolation that needs Hydra's runtime
            dirpath = None
        if dirpath and Path(dirpath) not in folders:
            folders.append(Path(dirpath))
    return folders or [run_dir / "checkpoints"]


def _read_stored(path: Path) -> DictConfig:
    """A run's stored `.hydra/*.yaml`, or one line saying it cannot be read."""
    try:
        cfg = OmegaConf.load(path)
    except Exception as error:  # YAML syntax, encoding, permissions, ...
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        cfg, problem = None, f"does not load ({reason})"
    else:
        problem = "is not a mapping of config keys"
    if not isinstance(cfg, DictConfig):
        raise UserError(
            f"cannot resume: the run's stored config {path} {problem}; restore it from a "
            "copy (.hydra/resume-N/ keeps earlier ones) or start a new run without resume="
        )
    return cfg


def _is_run_dir(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file()


def _original_output_dir(run_dir: Path) -> Path:
    """The run folder as spelled when the run started: checkpoints record that path."""
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        recorded = OmegaConf.select(_read_stored(hydra_yaml), "hydra.runtime.output_dir")
        if recorded and Path(recorded).is_dir() and Path(recorded).samefile(run_dir):
            return Path(recorded)
    return run_dir


def _config_groups(hydra_dir: Path) -> set[str]:
    hydra_yaml = hydra_dir / "hydra.yaml"
    if not hydra_yaml.is_file():
        return set()
    choices = OmegaConf.select(_read_stored(hydra_yaml), "hydra.runtime.choices") or {}
    return {group for group in choices if not group.startswith("hydra/")}


def _job_name(hydra_dir: Path) -> str | None:
    hydra_yaml = hydra_dir / "hydra.yaml"
    if not hydra_yaml.is_file():
        return None
    return OmegaConf.select(_read_stored(hydra_yaml), "hydra.job.name")


def _load_stored_checkpoint(checkpoint: Path) -> dict:
    """The checkpoint, memory-mapped and without running code, or one line saying it cannot be."""
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"cannot resume from {checkpoint}: it does not load ({reason}); "
            "give another checkpoint with resume=PATH"
        ) from None


def check_resumable(checkpoint: str | Path, config: Any, words: list[str]) -> None:
    """One line where the resumed run's data or model (the stored config with this command's
    overrides) is not the checkpoint's: another vocabulary (a data or tokenizer override),
    another shape (model.n_embd=64, data.seq_len=32). Lightning's loading of the state would
    stop with a size-mismatch traceback. The stored config is put back by
    `restores_stored_config_if_refused`."""
    meta = _load_stored_checkpoint(Path(checkpoint)).get(METADATA_KEY)
    if not isinstance(meta, dict):
        return  # not lmlab's metadata: loading the state reports it
    trained_words = meta.get("vocab")
    if isinstance(trained_words, list) and list(trained_words) != list(words):
        raise UserError(
            f"the checkpoint {checkpoint} was trained with a vocabulary of {len(trained_words)} "
            f"tokens, this run's data gives {len(words)} (another corpus or tokenizer); a "
            "resumed run keeps its data: drop the data and tokenizer overrides"
        )
    if isinstance(meta.get("model_config"), dict):
        check_compatible(
            config_from_dict(meta["model_config"]),
            config,
            str(checkpoint),
            what="the checkpoint",
            fix="a resumed run keeps its model: drop those overrides",
        )


def restores_stored_config_if_refused(main: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """Wrap train.py's steps (outermost): a resumed run refused by a check (bad input,
    UserError) before it saved a checkpoint puts back what its start replaced, the stored
    config and `result.json` (kept in `.hydra/resume-N/`).

    Hydra writes the resumed run's config, overrides included, over the run's own before
    any check runs, and `record_result` writes a failed result; a refused override
    (optimizer.lr=abc, model.n_embd=64, another corpus) stayed in the config and refused
    every later `resume=` of the run too.
    """

    @functools.wraps(main)
    def wrapper(cfg: DictConfig) -> T:
        started = time.time()
        try:
            return main(cfg)
        except Exception as error:
            run_dir = Path(cfg.paths.output_dir)
            refused = find_user_error(error) is not None
            saved = refused and any(p.stat().st_mtime > started for p in run_dir.rglob("*.ckpt"))
            if cfg.get(RESUME_KEY) and refused and not saved and not joins_another_process():
                _restore_previous_config(run_dir / ".hydra")
            raise

    return wrapper


_KEPT_CONFIG = ("config.yaml", "hydra.yaml", "overrides.yaml")


def _restore_previous_config(hydra_dir: Path) -> None:
    """Move the newest `.hydra/resume-N/` back: its config files over `.hydra/`, its
    `result.json` (or none, if the run had none) over the run folder's."""
    kept = sorted(hydra_dir.glob("resume-*"), key=lambda p: int(p.name.split("-")[1]))
    if not kept:
        return
    for name in _KEPT_CONFIG:
        if (kept[-1] / name).is_file():
            shutil.copy2(kept[-1] / name, hydra_dir / name)
    result = hydra_dir.parent / RESULT_FILE
    if (kept[-1] / RESULT_FILE).is_file():
        shutil.copy2(kept[-1] / RESULT_FILE, result)
    else:
        result.unlink(missing_ok=True)
    shutil.rmtree(kept[-1])


def _keep_previous_config(hydra_dir: Path) -> None:
    """Hydra rewrites .hydra/ for the resumed run (and the run rewrites result.json); keep
    what was there as .hydra/resume-N/."""
    number = 1 + sum(1 for _ in hydra_dir.glob("resume-*"))
    keep = hydra_dir / f"resume-{number}"
    keep.mkdir()
    for path in (*(hydra_dir / name for name in _KEPT_CONFIG), hydra_dir.parent / RESULT_FILE):
        if path.is_file():
            shutil.copy2(path, keep / path.name)


def _quote(value: str) -> str:
    """A Hydra override value that keeps any path as it is."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- random number generators -------------------------------------------------


class ResumeState(L.Callback):
    """What Lightning does not restore by itself: every RNG, and the training loader's position.

    Lightning restores the loader's position only when it builds the training
    loader after loading the checkpoint; `estimated_stepping_batches` (used
    for the LR schedule) builds it before. Both are applied at
    `on_train_start`, right before the first resumed step. States are tensors
    and plain numbers only, so checkpoints load with `weights_only=True`.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict) -> None:
        loader = trainer.train_dataloader
        checkpoint[RESUME_STATE_KEY] = {
            "rng": rng_state(),
            "train_loader": loader.state_dict() if hasattr(loader, "load_state_dict") else None,
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict) -> None:
        self._to_restore = checkpoint.get(RESUME_STATE_KEY)
        if self._to_restore is None and trainer.is_global_zero:
            log.warning(
                "the checkpoint has no %s entry (not written by lmlab's train.py, or an older "
                "lmlab): weights, optimizer and counters continue, but the random number "
                "generators and the data order start afresh, so this is not an exact "
                "continuation of the run",
                RESUME_STATE_KEY,
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state, self._to_restore = self._to_restore, None
        if state is None:
            return
        loader = trainer.train_dataloader
        if state["train_loader"] is not None:
            loader.load_state_dict(state["train_loader"])
        set_rng_state(state["rng"])


def rng_state() -> dict[str, Any]:
    """The state of every RNG a training step may draw from, as tensors and plain numbers."""
    version, mt, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            print(
                f"warning: the checkpoint has CUDA RNG states for {len(state['cuda'])} "
                f"devices, this machine has {torch.cuda.device_count()}; not restored",
                file=sys.stderr,
            )
