"""Learning-rate schedules, stepped once per optimizer step."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 100,
    min_lr_ratio: float = 0.1,
) -> LambdaLR:
    """Linear warm-up from 0 to the base LR, then cosine decay to `min_lr_ratio` x base."""
    if warmup_steps < 0:
        raise ValueError(f"scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def constant(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """The base LR throughout, after an optional linear warm-up."""
    if warmup_steps < 0:
        raise ValueError(f"scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def epoch_decay(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    epochs: int,
    decay_after: int,
    factor: float,
) -> LambdaLR:
    """The base LR for `decay_after` epochs, then multiplied by `factor` at every new epoch.

    Zaremba et al. 2014: lr 1, halved (factor 0.5) each epoch after the 4th. The
    schedule is stepped per optimizer step; an epoch is `total_steps // epochs` steps.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"scheduler.epochs must be a positive integer, got {epochs!r}")
    if decay_after < 0:
        raise ValueError(f"scheduler.decay_after must be >= 0, got {decay_after}")
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"scheduler.factor must be in (0, 1], got {factor}")
    steps_per_epoch = max(1, total_steps // epochs)

    def lr_factor(step: int) -> float:
        epoch = step // steps_per_epoch  # 0-based
        return factor ** max(0, epoch + 1 - decay_after)

    return LambdaLR(optimizer, lr_factor)
