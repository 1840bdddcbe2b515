"""Rich progress for the long loops outside training: evaluation, decoding, data preparation.

Shown on an interactive terminal only (stderr is a TTY), and cleared when done, so
logs, pipes and `output=jsonl` stay clean.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import track as rich_track

T = TypeVar("T")


def _interactive() -> bool:
    return sys.stderr.isatty()


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """`items`, with a progress bar (count, rate, time left) on an interactive terminal."""
    if not _interactive():
        return items
    return rich_track(
        items, description=description, total=total, transient=True, console=Console(stderr=True)
    )


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with `message` while the block runs, on an interactive terminal."""
    if not _interactive():
        yield
        return
    with Console(stderr=True).status(message):
        yield
