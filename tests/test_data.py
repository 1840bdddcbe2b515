import hashlib
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.data import IGNORE_INDEX, BlockBatches, LMDataModule, TokenBlocks, token_dtype
from lmlab.errors import UserError
from lmlab.token_file import TokenFile
from lmlab.vocab import tokenize

from conftest import serve_folder

FILES = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}


def datamodule(folder: Path, cache: Path, **kwargs) -> LMDataModule:
    args = dict(data_dir=str(folder), files=FILES, cache_dir=str(cache), seq_len=16, batch_size=4)
    return LMDataModule(**{**args, **kwargs})


def ids(store: np.ndarray) -> torch.Tensor:
    """A split's token store (or array) as an int64 tensor in memory."""
    return torch.from_numpy(np.asarray(store, dtype=np.int64))


def in_memory_blocks(tokens: torch.Tensor, seq_len: int, pad_last: bool):
    """Blocks as lmlab built them before the token store: the whole stream, viewed."""
    stream = torch.cat([torch.tensor([0]), tokens])
    inputs, targets = stream[:-1], stream[1:]
    if pad_last:
        pad = -len(targets) % seq_len
        inputs = torch.cat([inputs, inputs.new_full((pad,), 0)])
        targets = torch.cat([targets, targets.new_full((pad,), IGNORE_INDEX)])
    else:
        usable = len(targets) // seq_len * seq_len
        inputs, targets = inputs[:usable], targets[:usable]
    return inputs.view(-1, seq_len), targets.view(-1, seq_len)


def test_the_token_store_serves_the_batches_of_the_in_memory_blocks(corpus_dir, cache_dir):
    dm = datamodule(corpus_dir, cache_dir, eval_batch_size=5)
    dm.setup("fit")
    store = dm.tokens["train"]
    assert isinstance(store, TokenFile) and store.dtype == np.uint16  # 65 words fit in 16 bits
    inputs, targets = in_memory_blocks(ids(store), 16, pad_last=False)
    loader = dm.train_dataloader()
    assert loader.dataset.tokens is store  # batches gather from the file: no copy of the split
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader.sampler) > 0
        for (x, y), index in zip(batches, loader.sampler._batches(), strict=True):
            assert torch.equal(x, inputs[index]) and torch.equal(y, targets[index])
    inputs, targets = in_memory_blocks(ids(dm.tokens["valid"]), 16, pad_last=True)
    served = list(dm.val_dataloader())
    assert torch.equal(torch.cat([x for x, _ in served]), inputs)
    assert torch.equal(torch.cat([y for _, y in served]), targets)


def test_ids_are_stored_in_the_smallest_type_that_holds_the_vocabulary():
    assert token_dtype(10_000) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(267_735) == np.uint32


def count_tokens(path: Path) -> int:
    return sum(len(tokenize(line)) for line in path.read_text().splitlines())


def test_token_counts_are_exact_and_vocabulary_comes_from_train(corpus_dir, cache_dir):
    dm = datamodule(corpus_dir, cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    for split in ("train", "valid", "test"):
        assert len(dm.tokens[split]) == count_tokens(corpus_dir / FILES[split])
    train_words = {
        w for line in (corpus_dir / FILES["train"]).read_text().splitlines() for w in line.split()
    }
    assert set(dm.vocab.words) == train_words | {"<eos>", "<unk>"}


def test_training_blocks_shift_targets_by_one_token(corpus_dir, cache_dir):
    dm = datamodule(corpus_dir, cache_dir)
    dm.setup("fit")
    stream = torch.cat([torch.tensor([0]), ids(dm.tokens["train"])])
    inputs, targets = next(iter(dm.train_dataloader()))
    assert inputs.shape == targets.shape == (4, 16)
    assert inputs.dtype == torch.long
    for row_inputs, row_targets in zip(inputs, targets):
        # find where this block starts in the stream: blocks are aligned to seq_len
        starts = [
            s for s in range(0, len(stream) - 16, 16) if torch.equal(stream[s : s + 16], row_inputs)
        ]
        assert starts, "a training block is not a slice of the token stream"
        assert torch.equal(stream[starts[0] + 1 : starts[0] + 17], row_targets)


def test_validation_predicts_every_token_exactly_once_in_order(corpus_dir, cache_dir):
    dm = datamodule(corpus_dir, cache_dir, eval_batch_size=3)
    dm.setup("validate")
    targets = torch.cat([t.flatten() for _, t in dm.val_dataloader()])
    real = targets[targets != IGNORE_INDEX]
    assert torch.equal(real, ids(dm.tokens["valid"]))  # all of them, once, in order
    assert (targets == IGNORE_INDEX).sum() < 16  # only the last block is padded


def test_evaluation_batches_split_across_ranks_without_repeats():
    for world_size in (1, 2, 3):
        seen = []
        for rank in range(world_size):
            seen += [i for batch in BlockBatches(23, 4, False, 0, rank, world_size) for i in batch]
        assert sorted(seen) == list(range(23))


def test_training_order_is_seeded_per_epoch_and_ranks_are_disjoint():
    sampler = BlockBatches(40, 4, shuffle=True, seed=7)
    first = list(sampler)
    assert first == list(BlockBatches(40, 4, shuffle=True, seed=7))
    sampler.set_epoch(1)
    assert list(sampler) != first
    ranks = [list(BlockBatches(40, 4, True, 7, rank, 2)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}


def test_token_blocks_pad_only_the_last_evaluation_block():
    blocks = TokenBlocks(torch.arange(1, 11), seq_len=4, pad_last=True)
    inputs, targets = blocks.all_blocks()
    assert inputs.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
    assert targets.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, -100, -100]]
    train = TokenBlocks(torch.arange(1, 11), seq_len=4, pad_last=False)
    assert len(train) == 2


def test_loader_workers_serve_the_batches_the_main_process_does(corpus_dir, cache_dir):
    # Forked workers share the store's open file (reads give their offset), so each serves
    # exactly the batches of the main process.
    served = {}
    for workers in (0, 2):
        dm = datamodule(corpus_dir, cache_dir, num_workers=workers)
        dm.setup("fit")
        served[workers] = list(dm.train_dataloader()), list(dm.val_dataloader())
    for alone, with_workers in zip(served[0], served[2], strict=True):
        assert len(alone) == len(with_workers) > 0
        for (x, y), (x2, y2) in zip(alone, with_workers, strict=True):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_second_prepare_reads_the_cache(corpus_dir, cache_dir, monkeypatch):
    datamodule(corpus_dir, cache_dir).prepare_data()

    def fail(*_):
        raise AssertionError("encoded again instead of reading the cache")

    monkeypatch.setattr(LMDataModule, "_encode_splits", fail)
    dm = datamodule(corpus_dir, cache_dir)
    dm.prepare_data()
    dm.setup()
    assert len(dm.tokens["train"]) > 0


def test_a_damaged_cached_split_names_the_cache_and_the_fix(corpus_dir, tmp_path):
    cache_dir = tmp_path / "cache"  # its own: the shared one serves the other tests
    dm = datamodule(corpus_dir, cache_dir)
    dm.prepare_data()
    stored = dm.cache_path / "valid.npy"
    stored.write_bytes(stored.read_bytes()[:-2])  # one token id short
    dm = datamodule(corpus_dir, cache_dir)
    with pytest.raises(UserError) as refused:
        dm.setup()
    assert str(refused.value) == (
        f"the token cache {dm.cache_path} is damaged ({stored} ends before its "
        f"{count_tokens(corpus_dir / FILES['valid'])} token ids); delete that folder and run "
        "again to encode the corpus anew"
    )


def test_missing_files_offline_name_the_folder_and_files(tmp_path):
    dm = datamodule(tmp_path / "nowhere", tmp_path / "cache")
    with pytest.raises(
        UserError, match=r"put ptb.train.txt, ptb.valid.txt, ptb.test.txt in .*nowhere"
    ):
        dm.prepare_data()


def test_a_file_for_the_folder_a_folder_for_a_file_and_non_utf8_text_are_refused(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("a b c\n")
    with pytest.raises(UserError, match=r"data.data_dir=.*plain.txt is a file; point it at"):
        datamodule(plain, tmp_path / "cache").prepare_data()
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in FILES.values():
        (folder / name).write_text("a b c\n")
    (folder / "ptb.valid.txt").unlink()
    (folder / "ptb.valid.txt").mkdir()
    with pytest.raises(UserError, match=r"ptb.valid.txt is a folder, not the valid split's"):
        datamodule(folder, tmp_path / "cache").prepare_data()
    (folder / "ptb.valid.txt").rmdir()
    (folder / "ptb.valid.txt").write_bytes("caf\u00e9 au lait\n".encode("latin1"))
    with pytest.raises(
        UserError, match=r"ptb.valid.txt is not UTF-8 text \(byte 0xe9 at offset 3\); convert it"
    ):
        datamodule(folder, tmp_path / "cache").prepare_data()


def test_wrong_checksum_and_empty_file_are_refused_with_the_path(tmp_path, corpus_dir):
    md5 = {"train": "0" * 32}
    with pytest.raises(UserError, match=r"ptb.train.txt has md5 \w+, expected 0{32}"):
        datamodule(corpus_dir, tmp_path, md5=md5).prepare_data()
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in FILES.values():
        (empty / name).write_text("a b c\n")
    (empty / "ptb.test.txt").write_text("")
    with pytest.raises(UserError, match=r"ptb.test.txt is empty"):
        datamodule(empty, tmp_path).prepare_data()


@pytest.mark.parametrize(
    "kwargs, message", [(dict(seq_len=0), "data.seq_len"), (dict(batch_size=-1), "data.batch_size")]
)
def test_bad_sizes_are_refused(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=f"{message} must be a positive integer"):
        datamodule(tmp_path, tmp_path, **kwargs)


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/served."""
    served = tmp_path / "served"
    served.mkdir()
    with serve_folder(served) as base:
        yield served, base


def test_prepare_downloads_missing_files_and_verifies_them(http_server, corpus_dir, tmp_path):
    served, base = http_server
    md5 = {}
    for split, name in FILES.items():
        data = (corpus_dir / name).read_bytes()
        (served / name).write_bytes(data)
        md5[split] = hashlib.md5(data).hexdigest()
    urls = {split: f"{base}/{name}" for split, name in FILES.items()}
    dm = datamodule(tmp_path / "ptb", tmp_path / "cache", urls=urls, md5=md5)
    dm.prepare_data()
    for name in FILES.values():
        assert (tmp_path / "ptb" / name).read_bytes() == (corpus_dir / name).read_bytes()
    assert not list((tmp_path / "ptb").glob(".*tmp"))  # no temporary files left behind


def test_unreachable_server_gives_an_offline_hint(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    urls = {split: f"http://127.0.0.1:{port}/{name}" for split, name in FILES.items()}
    dm = datamodule(tmp_path / "ptb", tmp_path / "cache", urls=urls)
    with pytest.raises(UserError, match=r"could not download .*offline\? put ptb.train.txt"):
        dm.prepare_data()
    assert not (tmp_path / "ptb" / "ptb.train.txt").exists()


def test_a_prepared_module_does_not_hash_the_corpus_again(corpus_dir, cache_dir, monkeypatch):
    dm = datamodule(corpus_dir, cache_dir)
    dm.prepare_data()  # train.py's call, for the vocabulary

    def fail(*_):
        raise AssertionError("hashed the corpus again")

    monkeypatch.setattr("lmlab.data.file_digest", fail)
    dm.prepare_data()  # Lightning's call inside fit()
    assert dm.vocab.words[:2] == ["<eos>", "<unk>"]
