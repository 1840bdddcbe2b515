"""WikiText as released: one zip archive served over real HTTP on 127.0.0.1, or an offline folder."""

import hashlib
import socket
import zipfile
from pathlib import Path

import pytest
import yaml

from lmlab.data import LMDataModule
from lmlab.errors import UserError

from conftest import ROOT, serve_folder

CONF = yaml.safe_load((ROOT / "conf" / "data" / "wikitext2.yaml").read_text())
FILES = CONF["files"]

# WikiText's layout: a blank line (one space) around each heading, headings as " = Title = ",
# paragraphs of space-separated tokens with <unk>, @-@ and non-ASCII text, a leading space.
ARTICLE = [
    " ",
    " = Valkyria Chronicles III = ",
    " ",
    " Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 ) , commonly "
    "referred to as Valkyria Chronicles III outside Japan , is a tactical role @-@ playing game . ",
    " ",
    " = = Gameplay = = ",
    " ",
    " As with previous <unk> Chronicles games , Valkyria Chronicles III is a tactical game . ",
    " The game 's battle system , the <unk> system , is carried over directly . ",
]


def write_wikitext(folder: Path, suffix: str = ".tokens") -> Path:
    """The three splits in WikiText's layout (train: the article three times)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, copies in (("train", 3), ("valid", 1), ("test", 2)):
        name = FILES[split].replace(".tokens", suffix)
        (folder / name).write_text("\n".join(ARTICLE * copies) + "\n", encoding="utf-8")
    return folder


def expected_tokens(path: Path) -> int:
    """Words plus one <eos> per line, as `wc -w` + `wc -l` count them (not lmlab's reader)."""
    text = path.read_text(encoding="utf-8")
    return len(text.split()) + text.count("\n")


def zip_of(folder: Path, zip_path: Path, inside: str = "wikitext-2") -> str:
    """Zip `folder`'s files under `inside/` as the release does; return the sha256."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(folder.iterdir()):
            zipped.write(path, f"{inside}/{path.name}")
    return hashlib.sha256(zip_path.read_bytes()).hexdigest()


def datamodule(folder: Path, cache: Path, archive: dict | None = None) -> LMDataModule:
    return LMDataModule(
        data_dir=str(folder),
        files=FILES,
        archive=archive,
        cache_dir=str(cache),
        seq_len=8,
        batch_size=2,
    )


@pytest.fixture
def served(tmp_path: Path):
    """tmp_path/served/wikitext-2-v1.zip on a real HTTP server; (url, sha256, source folder)."""
    source = write_wikitext(tmp_path / "source")
    (tmp_path / "served").mkdir()
    sha256 = zip_of(source, tmp_path / "served" / "wikitext-2-v1.zip")
    with serve_folder(tmp_path / "served") as base:
        yield f"{base}/wikitext-2-v1.zip", sha256, source


def test_the_archive_is_downloaded_verified_and_unpacked(served, tmp_path: Path) -> None:
    url, sha256, source = served
    folder = tmp_path / "wikitext-2"
    dm = datamodule(
        folder, tmp_path / "cache", {"url": url, "sha256": sha256, "folder": "wikitext-2"}
    )
    dm.prepare_data()
    dm.setup()
    for split, name in FILES.items():
        assert (folder / name).read_bytes() == (source / name).read_bytes()
        # every line, the empty ones too, ends with an <eos>: the rule of the published counts
        assert len(dm.tokens[split]) == expected_tokens(source / name)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        FILES.values()
    )  # no zip, no temporaries
    assert "<unk>" in dm.vocab.words[:10] and "=" in dm.vocab.words


def test_a_wrong_sha256_leaves_no_file(served, tmp_path: Path) -> None:
    url, _, _ = served
    folder = tmp_path / "wikitext-2"
    dm = datamodule(
        folder, tmp_path / "cache", {"url": url, "sha256": "0" * 64, "folder": "wikitext-2"}
    )
    with pytest.raises(
        UserError, match=r"has sha256 \w+, expected 0{64}.*offline\? put wiki.train"
    ):
        dm.prepare_data()
    assert not folder.exists() or not list(folder.iterdir())


def test_an_unreachable_server_gives_the_offline_hint(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    archive = {"url": f"http://127.0.0.1:{port}/wikitext-2-v1.zip", "sha256": "0" * 64}
    dm = datamodule(
        tmp_path / "wikitext-2", tmp_path / "cache", {**archive, "folder": "wikitext-2"}
    )
    with pytest.raises(
        UserError, match=r"could not download .*offline\? put wiki.train.tokens, wiki.valid.tokens"
    ):
        dm.prepare_data()


def test_an_offline_folder_is_read_without_the_network(tmp_path: Path) -> None:
    folder = write_wikitext(tmp_path / "offline")
    unreachable = {"url": "http://127.0.0.1:9/never.zip", "sha256": "0" * 64, "folder": "x"}
    dm = datamodule(folder, tmp_path / "cache", unreachable)
    dm.prepare_data()
    dm.setup()
    assert len(dm.tokens["test"]) == expected_tokens(folder / FILES["test"])


def test_a_folder_of_raw_files_is_refused_in_one_line(tmp_path: Path) -> None:
    folder = write_wikitext(tmp_path / "raw", suffix=".raw")
    with pytest.raises(UserError, match=r"holds wiki.train.raw, .*the raw release.*tokenised"):
        datamodule(folder, tmp_path / "cache", CONF["archive"]).prepare_data()


def test_train_py_refuses_a_raw_folder_with_exit_2(tmp_path: Path) -> None:
    from conftest import run_entry_point

    folder = write_wikitext(tmp_path / "raw", suffix=".raw")
    result = run_entry_point(
        "train.py", "data=wikitext2", f"data.data_dir={folder}", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and "raw release" in result.stderr
