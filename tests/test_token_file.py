import gc
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from lmlab.token_file import RUN_GAP, TokenFile


@pytest.fixture(params=[np.uint16, np.uint32])
def stored(tmp_path, request):
    ids = np.random.default_rng(0).integers(0, 60_000, 50_000).astype(request.param)
    path = tmp_path / "train.npy"
    np.save(path, ids)
    return path, ids


def test_reads_what_numpy_stored(stored):
    path, ids = stored
    store = TokenFile(path)
    assert len(store) == len(ids) and store.dtype == ids.dtype and store.nbytes == ids.nbytes
    assert np.array_equal(np.asarray(store), ids)
    assert np.array_equal(np.asarray(store, dtype=np.int64), ids.astype(np.int64))


def test_any_index_gives_numpys_answer(stored):
    path, ids = stored
    store = TokenFile(path)
    rng = np.random.default_rng(1)
    windows = rng.integers(0, len(ids) - 64, 32)[:, None] + np.arange(64)  # a batch of blocks
    scattered = rng.permutation(windows.ravel()).reshape(8, 256)  # any order, repeats
    far_apart = np.array([0, RUN_GAP, RUN_GAP + 1, 3 * RUN_GAP + 5, len(ids) - 1, 7, 7])
    for index in (windows, scattered, far_apart, np.array([-1, -len(ids)]), np.array(5)):
        assert np.array_equal(store[index], ids[index]), index
    assert store[np.array([], dtype=np.int64)].shape == (0,)
    for part in (
        slice(10, 20),
        slice(None),
        slice(len(ids) - 3, None),
        slice(5, 2),
        slice(0, 9, 4),
    ):
        assert np.array_equal(store[part], ids[part]), part


def test_bad_index_is_refused(stored):
    path, ids = stored
    store = TokenFile(path)
    with pytest.raises(IndexError, match="out of range"):
        store[np.array([0, len(ids)])]
    with pytest.raises(IndexError, match="out of range"):
        store[np.array([-len(ids) - 1])]
    with pytest.raises(TypeError, match="integers"):
        store[np.array([0.5])]


def test_a_copy_for_a_spawned_worker_reopens_the_file(stored):
    path, ids = stored
    copy = pickle.loads(pickle.dumps(TokenFile(path)))
    assert np.array_equal(copy[np.arange(100, 200)], ids[100:200])


def test_its_file_is_closed_when_it_goes_and_at_exit_without_a_word(stored):
    path, _ = stored
    store = TokenFile(path)
    fd = store._fd
    os.fstat(fd)  # open
    del store
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)
    # one that lives until the interpreter exits (a script's data module, with lmlab.data's
    # imports loaded) is closed quietly: a __del__ that ran after `os` was torn down printed
    # "Exception ignored ... AttributeError: 'NoneType' object has no attribute 'close'"
    script = (
        "import lmlab.data\n"
        "from lmlab.token_file import TokenFile\n"
        "class Holder: pass\n"
        f"holder = Holder(); holder.tokens = {{'train': TokenFile({str(path)!r})}}\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_a_file_that_is_not_one_array_of_ids_or_is_cut_short_is_refused(tmp_path):
    np.save(tmp_path / "matrix.npy", np.zeros((2, 3), dtype=np.uint16))
    with pytest.raises(ValueError, match="1-D array of token ids"):
        TokenFile(tmp_path / "matrix.npy")
    np.save(tmp_path / "floats.npy", np.zeros(3))
    with pytest.raises(ValueError, match="1-D array of token ids"):
        TokenFile(tmp_path / "floats.npy")
    path = tmp_path / "cut.npy"
    np.save(path, np.arange(1000, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="ends before its 1000 token ids"):
        TokenFile(path)
    (tmp_path / "text.npy").write_text("the cat sat")
    with pytest.raises(ValueError):
        TokenFile(tmp_path / "text.npy")


def test_a_file_cut_short_while_open_is_refused_when_read(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(1000, dtype=np.uint16))
    store = TokenFile(path)
    path.write_bytes(path.read_bytes()[:-100])  # the same file, shorter
    assert np.array_equal(store[np.arange(10)], np.arange(10))
    with pytest.raises(OSError, match="ends before its 1000 token ids"):
        store[np.array([999])]


def resident_file_pages_mib() -> float:
    """This process's resident file-backed pages (Linux), what a memory map of the split adds to."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


def test_reading_every_id_keeps_none_of_the_file_resident(tmp_path):
    # A memory map of the same file would hold all 32 MiB once every batch has touched it.
    path = tmp_path / "big.npy"
    np.save(path, np.arange(8 * 2**20, dtype=np.uint32))
    store = TokenFile(path)
    before = resident_file_pages_mib()
    for start in range(0, len(store), 2**16):
        assert store[np.arange(start, start + 2**16)][-1] == start + 2**16 - 1
    assert resident_file_pages_mib() - before < 4
    mapped = np.load(path, mmap_mode="r")  # the reference: the same reads from a memory map
    for start in range(0, len(mapped), 2**16):
        mapped[np.arange(start, start + 2**16)]
    assert resident_file_pages_mib() - before > 24
