"""Checks on a composed training config, and building the lists Lightning takes."""

from __future__ import annotations

import math
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from lmlab.errors import UserError
from lmlab.model import TransformerConfig


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def check_train_config(cfg: DictConfig) -> None:
    """Stop with one line on the first value out of range, before any work starts."""
    lr = _value(cfg, "optimizer.lr")
    _check(lr > 0, f"optimizer.lr must be > 0, got {lr}")
    weight_decay = _value(cfg, "optimizer.weight_decay", default=0.0)
    _check(weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {weight_decay}")

    for key in ("data.seq_len", "data.batch_size"):
        value = cfg.get("data", {}).get(key.split(".")[1])
        _check(
            isinstance(value, int) and not isinstance(value, bool) and value >= 1,
            f"{key} must be a positive integer, got {value!r}",
        )

    model_args = {k: v for k, v in cfg.model.items() if k != "_target_"}
    try:
        TransformerConfig(**model_args)
    except (TypeError, ValueError) as error:
        raise UserError(str(error)) from None

    if cfg.get("scheduler") is not None:
        warmup = cfg.scheduler.get("warmup_steps", 0)
        _check(
            isinstance(warmup, int) and warmup >= 0,
            f"scheduler.warmup_steps must be a non-negative integer, got {warmup!r}",
        )
        ratio = cfg.scheduler.get("min_lr_ratio", 0.0)
        _check(
            isinstance(ratio, int | float) and 0 <= ratio <= 1,
            f"scheduler.min_lr_ratio must be in [0, 1], got {ratio!r}",
        )

    trainer = cfg.trainer
    devices = trainer.get("devices", 1)
    _check(
        devices in ("auto", -1) or (isinstance(devices, int) and devices >= 1),
        f"trainer.devices must be a positive integer, -1 or 'auto', got {devices!r}",
    )
    max_epochs = trainer.get("max_epochs")
    _check(
        max_epochs is None
        or (isinstance(max_epochs, int) and max_epochs >= -1 and max_epochs != 0),
        f"trainer.max_epochs must be a positive integer (or -1 for no limit), got {max_epochs!r}",
    )
    max_steps = trainer.get("max_steps", -1)
    _check(
        isinstance(max_steps, int) and (max_steps == -1 or max_steps >= 1),
        f"trainer.max_steps must be a positive integer (or -1 for no limit), got {max_steps!r}",
    )
    clip = trainer.get("gradient_clip_val")
    _check(
        clip is None or (isinstance(clip, int | float) and clip >= 0),
        f"trainer.gradient_clip_val must be >= 0 or null, got {clip!r}",
    )


def _value(cfg: DictConfig, key: str, default: float | None = None) -> float:
    group, name = key.split(".")
    value = cfg.get(group, {}).get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{key} must be a number, got {value!r}")
    return float(value)


def instantiate_each(nodes: DictConfig | None) -> list[Any]:
    """One object per named node (`callbacks.*`, `logger.*`); empty or null gives [].

    A null node, or one whose target returns None (a callback switched off by
    a trainer flag, such as the progress bar), gives nothing.
    """
    if not nodes:
        return []
    objects = (instantiate(node) for node in nodes.values() if node is not None)
    return [obj for obj in objects if obj is not None]
