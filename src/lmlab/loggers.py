"""Experiment loggers: the resolved config for every logger, and W&B that never blocks a run.

W&B reads its API key from the environment (WANDB_API_KEY) or `wandb login`'s
~/.netrc, never from the config. Without a key, or with WANDB_MODE=offline,
the run logs offline into its own folder (one notice line says so and how to
upload it); it never prompts or waits for the network.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SECRET_NAME = re.compile(r"(API_KEY|TOKEN|SECRET|PASSWORD)$")
REDACTED = "<redacted>"


def _secret_values() -> list[str]:
    return [v for k, v in os.environ.items() if SECRET_NAME.search(k.upper()) and len(v) >= 8]


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, secrets) for v in value]
    if isinstance(value, str) and any(s in value for s in secrets):
        return REDACTED
    return value


def log_config(loggers: list[Logger], cfg: DictConfig) -> None:
    """Give every logger the resolved config, with any value that holds a secret from the environment redacted."""
    if not loggers:
        return
    params = _redact(OmegaConf.to_container(cfg, resolve=True), _secret_values())
    for logger in loggers:
        logger.log_hyperparams(params)


def wandb_api_key_available() -> bool:
    """Whether W&B could authenticate without asking: WANDB_API_KEY, an identity token, or ~/.netrc."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger, offline when no key is available, recording checkpoint paths.

    Args:
        offline: True or False forces the mode; None (the default) logs offline
            when WANDB_MODE is offline/dryrun or no API key is available.
        **kwargs: Lightning's WandbLogger arguments (project, name, group, ...).
    """

    def __init__(self, offline: bool | None = None, **kwargs: Any) -> None:
        save_dir = Path(kwargs.get("save_dir") or ".")
        mode = os.environ.get("WANDB_MODE", "").lower()
        if offline is None:
            offline = mode in ("offline", "dryrun") or (
                mode != "disabled" and not wandb_api_key_available()
            )
            if offline and rank_zero_only.rank == 0:
                reason = (
                    f"WANDB_MODE={mode}"
                    if mode in ("offline", "dryrun")
                    else "no API key (set WANDB_API_KEY or run `wandb login`)"
                )
                print(
                    f"W&B: {reason}; logging offline to {save_dir / 'wandb'}; "
                    f"upload later with `wandb sync {save_dir / 'wandb'}/offline-run-*`",
                    file=sys.stderr,
                    flush=True,
                )
        if offline:
            import wandb

            # offline: W&B's own banner lines add nothing to the notice above
            kwargs["mode"] = "offline"
            kwargs.setdefault("settings", wandb.Settings(silent=True))
        if kwargs.get("group") is None:
            kwargs["group"] = _sweep_group()
        if kwargs.get("name") is None and kwargs["group"] is not None:
            kwargs["name"] = f"job {save_dir.name}"  # the job's folder in the sweep
        super().__init__(**kwargs)
        init = getattr(self, "_wandb_init", {})
        if init.get("anonymous") is None:
            init.pop("anonymous", None)  # W&B warns that the setting is deprecated, even for None

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        self._record_checkpoints(checkpoint_callback)

    @rank_zero_only
    def _record_checkpoints(self, checkpoint_callback: Any) -> None:
        paths = {
            "checkpoint/best": getattr(checkpoint_callback, "best_model_path", ""),
            "checkpoint/last": getattr(checkpoint_callback, "last_model_path", ""),
        }
        self.experiment.summary.update({k: v for k, v in paths.items() if v})


def _sweep_group() -> str | None:
    """Runs of one sweep share a W&B group named after the sweep folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lmlab.run_folder import SWEEP_DIR_ENV

    if os.environ.get(SWEEP_DIR_ENV):
        return Path(os.environ[SWEEP_DIR_ENV]).name
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


def finish_wandb(ok: bool = True) -> None:
    """End the W&B run of this job, so the next job of a sweep starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=0 if ok else 1)
