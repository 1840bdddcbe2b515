"""The one downloader: streamed, verified, atomic; real HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from lmlab.download import download, file_digest
from lmlab.errors import UserError

from conftest import serve_folder


@pytest.fixture
def served(tmp_path: Path):
    folder = tmp_path / "served"
    folder.mkdir()
    with serve_folder(folder) as base:
        yield folder, base


def test_a_large_file_arrives_whole_and_verified(served, tmp_path: Path) -> None:
    folder, base = served
    data = os.urandom(5 << 20)  # several read chunks
    (folder / "big.bin").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    dest = download(f"{base}/big.bin", tmp_path / "out" / "big.bin", checksum=("sha256", digest))
    assert dest.read_bytes() == data
    assert file_digest(dest, "sha256") == digest
    assert list(dest.parent.iterdir()) == [dest]  # no temporary file left


@pytest.mark.parametrize("algorithm", ["md5", "sha256"])
def test_a_wrong_checksum_leaves_nothing_and_keeps_an_older_file(
    served, tmp_path: Path, algorithm: str
) -> None:
    folder, base = served
    (folder / "f.txt").write_text("not the corpus\n")
    dest = tmp_path / "out" / "f.txt"
    dest.parent.mkdir()
    dest.write_text("the older copy\n")
    wrong = "1" * len(hashlib.new(algorithm).hexdigest())
    with pytest.raises(UserError, match=f"has {algorithm} .* expected {wrong}; the source"):
        download(f"{base}/f.txt", dest, checksum=(algorithm, wrong))
    assert dest.read_text() == "the older copy\n"
    assert list(dest.parent.iterdir()) == [dest]


def test_missing_file_and_unreachable_server_say_so_in_one_line(served, tmp_path: Path) -> None:
    _, base = served
    with pytest.raises(
        UserError, match=r"could not download checkpoint .*/absent.ckpt: HTTP 404 File not found"
    ):
        download(f"{base}/absent.ckpt", tmp_path / "x", what="checkpoint ")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=r"could not download http://127.0.0.1:\d+/f: .*refused"):
        download(f"http://127.0.0.1:{port}/f", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
