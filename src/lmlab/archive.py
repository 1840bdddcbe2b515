"""A corpus released as one zip archive (WikiText): downloaded, verified, then unpacked.

The archive is fetched by the one downloader (`lmlab.download`, checked
against its sha256 while it streams) into a temporary folder beside the
corpus, and each wanted member is written out with `write_atomically`: a
split file is either absent or whole. The archive itself is deleted
afterwards (WikiText-103's is 190 MB); the unpacked files are what later runs
verify and read.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from lmlab.atomic import write_atomically
from lmlab.download import download
from lmlab.errors import UserError


def fetch_archive(url: str, sha256: str | None, members: Mapping[str, Path], folder: Path) -> None:
    """Download the zip at `url` and unpack `members` (name inside the zip -> destination).

    `folder` is where the temporary download goes (the corpus folder, so the
    renames stay on one file system). Raises `UserError` when the download
    fails or its checksum differs, or the archive lacks a member.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        archive = download(url, Path(tmp) / "archive.zip", checksum=sha256 and ("sha256", sha256))
        try:
            with zipfile.ZipFile(archive) as zipped:
                names = set(zipped.namelist())
                absent = [name for name in members if name not in names]
                if absent:
                    raise UserError(
                        f"the archive {url} holds no {', '.join(absent)}; "
                        "check data.archive.url and data.archive.folder"
                    )
                for name, dest in members.items():
                    with zipped.open(name) as source:
                        write_atomically(dest, lambda f, s=source: shutil.copyfileobj(s, f))
        except zipfile.BadZipFile as error:
            raise UserError(
                f"{url} is not a zip archive ({error}); check data.archive.url"
            ) from None
