"""Atomic file writes: a file is either its old self or wholly new, never half written.

Every file lmlab writes whole (checkpoints, cached token arrays, vocabularies,
downloads, `result.json`, `summary.json`, exported weights) goes through
`write_atomically`: the content goes to a temporary file in the destination's
own folder (same file system, so the final rename is atomic), is flushed and
fsynced, optionally checked, then renamed into place, and the folder is fsynced
so that the rename itself survives a power cut. A crash at any point (SIGKILL
included) leaves the previous file intact and, at worst, a temporary
`.NAME.RANDOM.tmp` beside it, which `stale_temporaries` finds.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"  # temporary files are named .NAME.RANDOM.tmp beside NAME

Writer = Callable[[BinaryIO], None]


def write_atomically(
    path: str | Path,
    content: bytes | str | Writer,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Write `content` (bytes, text, or a function writing into a binary file) to `path`.

    `verify(tmp_path)` runs on the finished temporary file before the rename;
    if it raises, `path` is untouched. Returns `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        # os.open, unlike mkstemp, gives the file the usual umask permissions
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode())
            elif isinstance(content, bytes | bytearray | memoryview):
                f.write(content)
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; not every file system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stale_temporaries(folder: Path, pattern: str = "*") -> Iterator[Path]:
    """Temporary files an interrupted `write_atomically` left in `folder` for names matching `pattern`."""
    return folder.glob(f".{pattern}.*{TMP_SUFFIX}")
