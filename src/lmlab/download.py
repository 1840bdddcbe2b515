"""Fetching a URL into a file: the one downloader for corpora, checkpoints and any http(s) source.

The response is streamed (never held in memory whole) into a temporary file
beside the destination, hashed on the way, and renamed into place only when
its checksum matches: the destination is either absent, or whole and verified.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from lmlab.atomic import write_atomically
from lmlab.errors import UserError

CHUNK = 1 << 20


def is_url(source: str | Path) -> bool:
    return str(source).startswith(("http://", "https://"))


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file's bytes, read in chunks."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str,
    dest: str | Path,
    *,
    checksum: tuple[str, str] | None = None,
    timeout: float = 60.0,
    what: str = "",
) -> Path:
    """Fetch `url` into `dest`; with `checksum` (algorithm, hex digest), only if it matches.

    `what` names the thing in messages ("checkpoint " gives "could not download
    checkpoint URL: ..."). Raises `UserError` when the server cannot be reached
    or answers with an error, and when the checksum differs; `dest` is then
    untouched.
    """
    algorithm = checksum[0] if checksum else "md5"

    def fetch(f: BinaryIO) -> None:
        digest = hashlib.new(algorithm)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    digest.update(chunk)
                    f.write(chunk)
        except urllib.error.HTTPError as error:  # the server answered, with an error
            raise UserError(
                f"could not download {what}{url}: HTTP {error.code} {error.reason}"
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise UserError(f"could not download {what}{url}: {reason}") from None
        if checksum is not None and digest.hexdigest() != checksum[1]:
            raise UserError(
                f"downloaded {url} has {algorithm} {digest.hexdigest()}, expected {checksum[1]}; "
                "the source may have changed or the transfer was corrupted"
            )

    return write_atomically(dest, fetch)
