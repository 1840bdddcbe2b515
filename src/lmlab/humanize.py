"""Durations and rates as people read them, in the progress bar and the run summary."""

from __future__ import annotations


def format_duration(seconds: float | None, decimals: int = 0) -> str:
    """`H:MM:SS` (with `decimals` digits of the seconds); '-' for None."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(max(0.0, float(seconds)), 60)
    hours, minutes = divmod(int(minutes), 60)
    if decimals:
        return f"{hours}:{minutes:02d}:{secs:0{3 + decimals}.{decimals}f}"
    return f"{hours}:{minutes:02d}:{int(secs):02d}"


def format_rate(value: float) -> str:
    """A rate with a k or M suffix: 980, 12.3k, 1.2M."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"
