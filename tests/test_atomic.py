"""The one atomic writer: a file is its old self or wholly new, never half written."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmlab.atomic import stale_temporaries, write_atomically


@pytest.mark.parametrize("content", [b"bytes\n", "text\n", lambda f: f.write(b"written\n")])
def test_writes_bytes_text_or_through_a_function(tmp_path: Path, content) -> None:
    path = write_atomically(tmp_path / "deep" / "f.txt", content)
    assert path.read_bytes() in (b"bytes\n", b"text\n", b"written\n")
    assert list(path.parent.iterdir()) == [path]


def test_a_failure_midway_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old\n")

    def half_then_fail(f) -> None:
        f.write(b"new but unfinis")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [path]


def test_a_failed_check_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old\n")
    seen = []

    def refuse(tmp: Path) -> None:
        seen.append(tmp.read_text())
        raise ValueError("does not load")

    with pytest.raises(ValueError, match="does not load"):
        write_atomically(path, "new\n", verify=refuse)
    assert seen == ["new\n"]  # the check saw the finished temporary file
    assert path.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [path]


def test_stale_temporaries_are_found_by_name(tmp_path: Path) -> None:
    (tmp_path / ".last.ckpt.0a1b2c3d.tmp").write_text("")
    (tmp_path / ".vocab.json.0a1b2c3d.tmp").write_text("")
    (tmp_path / "last.ckpt").write_text("")
    assert [p.name for p in stale_temporaries(tmp_path, "*.ckpt")] == [".last.ckpt.0a1b2c3d.tmp"]
