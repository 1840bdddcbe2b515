"""Learning-rate schedules, stepped once per optimizer step.

Each schedule's factor is a small callable object rather than a closure, for two
reasons: `LambdaLR.state_dict` saves a callable object's attributes (so a resumed
run gets back exactly the schedule it had), and a time budget (`lmlab.budget`)
can re-size `total_steps` once it has measured how fast the steps run.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """Linear warm-up from 0 to 1, then cosine decay to `min_lr_ratio` at `total_steps`."""

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        warmup, floor = self.warmup_steps, self.min_lr_ratio
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Warmup:
    """Linear warm-up to 1, then 1; `total_steps` does not matter to it."""

    def __init__(self, total_steps: int, warmup_steps: int) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / max(1, self.warmup_steps))


class EpochDecay:
    """1 for `decay_after` of the schedule's `epochs`, then x `factor` at each new one."""

    def __init__(self, total_steps: int, epochs: int, decay_after: int, factor: float) -> None:
        self.total_steps = total_steps
        self.epochs = epochs
        self.decay_after = decay_after
        self.factor = factor

    def __call__(self, step: int) -> float:
        # 0-based; the steps past `epochs` whole epochs (total_steps not a multiple) are the last
        epoch = min(self.epochs - 1, step // max(1, self.total_steps // self.epochs))
        return self.factor ** max(0, epoch + 1 - self.decay_after)


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
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, min_lr_ratio))


def constant(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """The base LR throughout, after an optional linear warm-up."""
    if warmup_steps < 0:
        raise ValueError(f"scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    return LambdaLR(optimizer, Warmup(total_steps, warmup_steps))


def epoch_decay(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    epochs: int,
    decay_after: int,
    factor: float,
) -> LambdaLR:
    """The base LR for `decay_after` epochs, then multiplied by `factor` at every new epoch.

    Zaremba et al. 2014: lr 1, halved (factor 0.5) each epoch after the 4th. The
    schedule is stepped per optimizer step; an epoch is `total_steps // epochs` steps
    (under a time budget, a share of the steps that fit, not of the data).
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"scheduler.epochs must be a positive integer, got {epochs!r}")
    if decay_after < 0:
        raise ValueError(f"scheduler.decay_after must be >= 0, got {decay_after}")
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"scheduler.factor must be in (0, 1], got {factor}")
    return LambdaLR(optimizer, EpochDecay(total_steps, epochs, decay_after, factor))


def resize(scheduler: object, total_steps: int) -> bool:
    """Give every factor of `scheduler` that has a length the new `total_steps`; False if none."""
    factors = [f for f in getattr(scheduler, "lr_lambdas", ()) if hasattr(f, "total_steps")]
    for factor in factors:
        factor.total_steps = total_steps
    return bool(factors)
