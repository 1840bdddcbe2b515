"""Penn Treebank, WikiText (and any plain-text corpus) as a LightningDataModule.

`prepare_data` finds or downloads the split files (one file each, or one zip
archive holding all three, as WikiText is released), verifies them, trains the
tokenizer (words, characters or BPE: lmlab.tokenizers) on the training split
and caches every split as token ids, once.
`setup` only loads that cache. Batches are made by slicing one token tensor,
never tensor-per-sample.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lmlab.archive import fetch_archive
from lmlab.atomic import write_atomically
from lmlab.checks import is_int, is_positive_int
from lmlab.download import download, file_digest
from lmlab.errors import UserError
from lmlab.loss import IGNORE_INDEX  # the target of padding positions; cross-entropy skips them
from lmlab.progress import status
from lmlab.streams import StreamWindows, Tokens, WindowOrder, next_token_pairs
from lmlab.token_file import TokenFile
from lmlab.tokenizers import Tokenizer, TokenizerSpec, tokenizer_from_dict
from lmlab.vocab import Vocabulary

TOKENIZER_FILE = "tokenizer.json"  # in the cache: the tokenizer's to_dict(), beside vocab.json

SPLITS = ("train", "valid", "test")
ORDERS = ("shuffled", "contiguous")
CACHE_FORMAT = 2  # bump when the cached files change meaning (2: uint16/uint32 token arrays)


def token_dtype(vocab_size: int) -> type:
    """The smallest unsigned type that holds every id: uint16 up to 65,536 tokens (PTB,
    WikiText-2, BPE), else uint32 (WikiText-103's 267,735 words)."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


# The last evaluation batch of a rank that has one batch fewer than the others: one block
# whose targets are all padding, so it scores nothing. Every rank then takes the same number
# of evaluation steps, which a sharded model needs: under FSDP every forward pass gathers
# the weights, a collective that all ranks must join.
SCORES_NOTHING = -1


class TokenBlocks(Dataset):
    """Fixed-length blocks of a token stream with next-token targets, read from it on demand.

    The stream starts with `<eos>` (the end of an imaginary previous line), so
    the first real token is predicted too and the targets are exactly the
    split's tokens. With `pad_last`, the final short block is padded (inputs
    with `<eos>`, targets with IGNORE_INDEX) so every token is a target once.
    `tokens` is a tensor, a NumPy array or the cached split (`TokenFile`): a
    batch gathers its blocks from it, nothing is copied whole, so memory does
    not grow with the corpus.
    """

    def __init__(self, tokens: Tokens, seq_len: int, pad_last: bool, eos_id: int = 0) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.total = len(tokens)
        self.num_blocks = -(-self.total // seq_len) if pad_last else self.total // seq_len
        self.offsets = torch.arange(seq_len)

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int | list[int]) -> tuple[Tensor, Tensor]:
        """One block, or a whole batch (`(batch, seq_len)` each) for a list of indices.

        `[SCORES_NOTHING]`: a batch of one block whose targets are all padding.
        """
        if index == [SCORES_NOTHING]:
            inputs, targets = self[[0]]
            return inputs, torch.full_like(targets, IGNORE_INDEX)
        # Target positions in the split; position p's input is token p - 1 (`<eos>` at 0).
        position = torch.as_tensor(index)[..., None] * self.seq_len + self.offsets
        return next_token_pairs(self.tokens, position, position < self.total, self.eos_id)

    def all_blocks(self) -> tuple[Tensor, Tensor]:
        """Every block's inputs and targets, (num_blocks, seq_len) each, gathered in one pass."""
        return self[list(range(self.num_blocks))]


def keep_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Collate function for `TokenBlocks`, which already returns whole batches."""
    return batch


class BlockBatches(Sampler[list[int]]):
    """Batches of block indices, shuffled per epoch by a seeded generator, sharded by rank.

    Training: every rank gets the same number of full batches. Evaluation
    (`shuffle=False`): blocks in order, batch `i` goes to rank `i % world_size`,
    nothing is repeated or dropped, so a reduced metric covers the split once.
    Evaluation batches shrink when needed so that every rank gets at least one:
    Lightning skips the epoch-end hooks (and so the metric reduction, a
    collective) on a rank without batches, which would hang the others. A rank
    with one batch fewer than the others ends with `[SCORES_NOTHING]`, so every
    rank takes the same number of evaluation steps (FSDP needs it).
    """

    def __init__(
        self,
        num_blocks: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.num_blocks = num_blocks
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0  # batches of `epoch` to skip on the next pass (set when resuming)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def _batches(self) -> Tensor | list[list[int]]:
        """This rank's batches of the epoch: training's as one (batches, batch_size) tensor,
        made a list one batch at a time by `__iter__` (as Python ints the whole epoch's
        indices were 64 MiB at 100M words), evaluation's as lists."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_blocks, generator=generator)
            per_rank = self.num_blocks // self.world_size // self.batch_size
            mine = order[self.rank :: self.world_size][: per_rank * self.batch_size]
            return mine.view(per_rank, self.batch_size)
        order = torch.arange(self.num_blocks)
        batches = [b.tolist() for b in order.split(self._eval_size)]
        mine = batches[self.rank :: self.world_size]
        return mine + [[SCORES_NOTHING]] * (self._eval_steps - len(mine))

    @property
    def _eval_steps(self) -> int:
        """Evaluation batches per rank, the same on every rank."""
        return -(-self._eval_batches // self.world_size)

    @property
    def _eval_batches(self) -> int:
        return -(-self.num_blocks // self._eval_size)

    @property
    def _eval_size(self) -> int:
        return max(1, min(self.batch_size, self.num_blocks // self.world_size))

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start = self.start, 0
        for batch in self._batches()[start:]:
            yield batch.tolist() if isinstance(batch, Tensor) else batch

    def __len__(self) -> int:
        if self.shuffle:
            return self.num_blocks // self.world_size // self.batch_size
        return self._eval_steps


class BatchLoader(DataLoader):
    """A DataLoader over `BlockBatches` that can stop mid-epoch and continue exactly.

    Checkpoints carry `state_dict()`: the epoch and how many of its batches
    were served. `load_state_dict()` before the next pass continues from
    there; a state saved after an epoch's last batch continues with the next
    epoch, never with the empty rest of the finished one (which would skip a
    whole epoch).
    """

    def __init__(self, dataset: TokenBlocks, sampler: BlockBatches, **kwargs) -> None:
        # The sampler yields whole batches (automatic batching off), so
        # Lightning finds it as `loader.sampler` and calls its `set_epoch`. The
        # loader's own generator keeps iterator creation off the global RNG,
        # whose state a resumed run restores exactly.
        generator = torch.Generator().manual_seed(sampler.seed)
        super().__init__(dataset, sampler=sampler, batch_size=None, generator=generator, **kwargs)
        self.served = 0  # batches of the current epoch handed out so far

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.served = self.sampler.start
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, served = int(state["epoch"]), int(state["batches"])
        if served >= len(self.sampler):  # saved on the last batch: the epoch is done
            epoch, served = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.start = served
        self.served = served


def check_utf8(path: Path, block: int = 1 << 20) -> None:
    """One line if `path` is not UTF-8 text, naming the first byte that is not."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                # error.object: the bytes decoded, with any a previous block left unfinished
                at = offset - (len(error.object) - len(chunk)) + error.start
                raise UserError(
                    f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                    f"{at}); "
                    f"convert it, e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt"
                ) from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text (it ends inside a character)") from None


class LMDataModule(L.LightningDataModule):
    """A word-level corpus of three splits, each a text file with one sentence per line.

    Args:
        data_dir: folder holding the split files (relative paths are from the
            current directory); missing files are downloaded there from `urls`.
        files: split name (train, valid, test) to file name or path.
        urls: split name to a download address, for corpora that have one.
        md5: split name to the expected md5 of the file; checked on every run.
        archive: for a corpus released as one zip archive (WikiText): `url`, its
            `sha256` (checked as it downloads) and the `folder` inside the archive
            that holds the split files; missing files are unpacked from it.
        seq_len: tokens per block.
        batch_size: training blocks per optimizer step (per process).
        eval_batch_size: blocks per validation or test batch (default: batch_size).
        cache_dir: where encoded splits are cached (default: ~/.cache/lmlab).
        seed: seeds the per-epoch shuffling of training blocks.
        num_workers: DataLoader worker processes (batches are slices: 0 is fastest).
        tokenizer: which tokenizer to train on the training split (`conf/tokenizer/`);
            None is `word`, one token per word.
        order: `shuffled` (blocks of `seq_len` tokens in a seeded random order each
            epoch) or `contiguous` (`batch_size` parallel streams read in consecutive
            windows, so a recurrent model's state carries over; see lmlab.streams).
    """

    def __init__(
        self,
        data_dir: str,
        files: Mapping[str, str],
        urls: Mapping[str, str] | None = None,
        md5: Mapping[str, str] | None = None,
        archive: Mapping[str, str] | None = None,
        seq_len: int = 64,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
        order: str = "shuffled",
        tokenizer: TokenizerSpec | None = None,
    ) -> None:
        super().__init__()
        if order not in ORDERS:
            raise UserError(f"data.order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.order = order
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not is_positive_int(value):
                raise UserError(f"data.{name} must be a positive integer, got {value!r}")
        if eval_batch_size is not None and not is_positive_int(eval_batch_size):
            raise UserError(
                f"data.eval_batch_size must be a positive integer, got {eval_batch_size!r}"
            )
        if not (is_int(num_workers) and num_workers >= 0):
            raise UserError(f"data.num_workers must be a non-negative integer, got {num_workers!r}")
        missing = [split for split in SPLITS if split not in files]
        if missing:
            raise UserError(
                f"data.files needs a file for each split; missing: {', '.join(missing)}"
            )
        self.data_dir = Path(data_dir).expanduser()
        self.paths = {split: self.data_dir / str(files[split]) for split in SPLITS}
        self.urls = dict(urls or {})
        self.md5 = dict(md5 or {})
        self.archive = dict(archive or {})
        if self.archive and not self.archive.get("url"):
            raise UserError(
                "data.archive needs a url (and sha256, folder); or set data.archive=null"
            )
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.cache_root = Path(cache_dir or Path.home() / ".cache" / "lmlab").expanduser()
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer_spec = tokenizer or TokenizerSpec()
        self.cache_path: Path | None = None  # set by prepare_data
        self.tokens: dict[str, TokenFile] = {}  # the cached token ids, by split

    # -- preparing: find or download, verify, encode once ------------------

    def _fetch_missing(self) -> None:
        names = ", ".join(self.paths[s].name for s in SPLITS)
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise UserError(
                f"data.data_dir={self.data_dir} is a file; point it at the folder that holds {names}"
            )
        for split in SPLITS:
            if self.paths[split].is_dir():
                raise UserError(
                    f"{self.paths[split]} is a folder, not the {split} split's text file; "
                    f"point data.files.{split} at the file"
                )
        missing = [s for s in SPLITS if not self.paths[s].is_file()]
        if not missing:
            return
        raw = [self.paths[s].with_suffix(".raw") for s in missing if self._raw_instead(s)]
        if raw:
            raise UserError(
                f"{self.data_dir} holds {', '.join(p.name for p in raw)}, the raw release, where "
                f"the tokenised {names} are expected: use the tokenised archive (e.g. "
                "wikitext-2-v1.zip, not wikitext-2-raw-v1.zip) or point data.data_dir at it"
            )
        offline = (
            f"put {names} in {self.data_dir} or point data.data_dir at the folder that holds them"
        )
        if not self.archive and any(s not in self.urls for s in missing):
            raise UserError(f"{self.paths[missing[0]]} not found: {offline}")
        try:
            if self.archive:
                inside = self.archive.get("folder") or ""
                members = {
                    f"{inside}/{self.paths[s].name}".lstrip("/"): self.paths[s] for s in missing
                }
                fetch_archive(
                    self.archive["url"], self.archive.get("sha256"), members, self.data_dir
                )
                return
            for split in missing:
                md5 = self.md5.get(split)
                download(self.urls[split], self.paths[split], checksum=md5 and ("md5", md5))
        except UserError as error:
            raise UserError(f"{error}; offline? {offline}") from None

    def _raw_instead(self, split: str) -> bool:
        """Whether the folder holds the raw WikiText file (`wiki.X.raw`) where `wiki.X.tokens` is wanted."""
        path = self.paths[split]
        return path.suffix == ".tokens" and path.with_suffix(".raw").is_file()

    def _verify(self) -> dict[str, str]:
        digests = {}
        for split in SPLITS:
            path = self.paths[split]
            if path.stat().st_size == 0:
                raise UserError(f"{path} is empty; replace it with the {split} split")
            digests[split] = file_digest(path, "md5")
            expected = self.md5.get(split)
            if expected is not None and digests[split] != expected:
                raise UserError(
                    f"{path} has md5 {digests[split]}, expected {expected}: the file is truncated "
                    "or not the expected corpus; delete it to download it again, or replace it"
                )
        return digests

    def prepare_data(self) -> None:
        if self.cache_path is not None:
            # train.py prepares before building the model (it needs the vocabulary);
            # Lightning's own call inside fit() must not hash the corpus again.
            return
        self._fetch_missing()
        digests = self._verify()
        identity = [CACHE_FORMAT, digests]
        if self.tokenizer_spec.kind != "word":  # the word cache keeps the key it always had
            identity.append(self.tokenizer_spec.to_dict())
        key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
        self.cache_path = self.cache_root / key
        if all(
            (self.cache_path / name).is_file()
            for name in (*(f"{s}.npy" for s in SPLITS), "vocab.json", TOKENIZER_FILE)
        ):
            return
        self._encode_splits()

    def _read_lines(self, splits: tuple[str, ...]) -> dict[str, list[str]]:
        # HF datasets reads the text (and caches the Arrow tables) so that any
        # plain-text corpus takes the same path as PTB.
        import datasets

        datasets.disable_progress_bars()
        try:
            corpus = datasets.load_dataset(
                "text",
                data_files={s: str(self.paths[s]) for s in splits},
                cache_dir=str(self.cache_root / "hf"),
            )
        except Exception:
            for split in splits:  # the usual cause: a file that is not UTF-8 text
                check_utf8(self.paths[split])
            raise
        # Straight from the Arrow table: `corpus[s]["text"]` is a lazy column in datasets 4+,
        # whose row-by-row iteration made preparing PTB cold 2 s slower (measured on 2 cores).
        return {s: corpus[s].data.column("text").to_pylist() for s in splits}

    def read_lines(self, split: str) -> list[str]:
        """The lines of one split, found or downloaded and verified as by `prepare_data`.

        For encoding a split with another vocabulary, e.g. a checkpoint's own.
        """
        self._fetch_missing()
        self._verify()
        return self._read_lines((split,))[split]

    def _encode_splits(self) -> None:
        what = f"training the {self.tokenizer_spec.kind} tokenizer"
        with status(f"preparing {self.data_dir}: reading, {what}, encoding"):
            self._encode_splits_now()

    def _encode_splits_now(self) -> None:
        lines = self._read_lines(SPLITS)
        tokenizer = self.tokenizer_spec.train(lines["train"])
        assert self.cache_path is not None
        self.cache_path.mkdir(parents=True, exist_ok=True)
        dtype = token_dtype(len(tokenizer))
        for split in SPLITS:
            ids = tokenizer.encode_lines(lines[split]).astype(dtype)
            write_atomically(self.cache_path / f"{split}.npy", lambda f, ids=ids: np.save(f, ids))
        write_atomically(self.cache_path / TOKENIZER_FILE, json.dumps(tokenizer.to_dict()))
        tokenizer.vocab.save(self.cache_path / "vocab.json")  # last: it marks the cache whole

    # -- loading ------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer trained on the training split (prepared first if need be)."""
        if self.cache_path is None:
            self.prepare_data()
        data = json.loads((self.cache_path / TOKENIZER_FILE).read_text())
        return tokenizer_from_dict(data, self.vocab.words)

    @property
    def vocab(self) -> Vocabulary:
        """The tokenizer's id table."""
        if self.cache_path is None:
            self.prepare_data()
        return Vocabulary.load(self.cache_path / "vocab.json")

    def setup(self, stage: str | None = None) -> None:
        if self.cache_path is None:
            self.prepare_data()
        for split in SPLITS:
            if split not in self.tokens:
                # read by position: batches read their windows from the file, which every
                # process (each DDP rank) shares through the page cache (lmlab.token_file)
                try:
                    self.tokens[split] = TokenFile(self.cache_path / f"{split}.npy")
                except (OSError, ValueError) as error:  # written atomically: damaged since
                    raise UserError(
                        f"the token cache {self.cache_path} is damaged ({error}); delete that "
                        "folder and run again to encode the corpus anew"
                    ) from None

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if self.order == "contiguous":
            return self._stream_loader(split, train=shuffle, batch_size=batch_size)
        blocks = TokenBlocks(self.tokens[split], self.seq_len, pad_last=not shuffle)
        rank, world_size = self._rank_and_world()
        sampler = BlockBatches(len(blocks), batch_size, shuffle, self.seed, rank, world_size)
        if shuffle and len(sampler) == 0:
            raise UserError(
                f"the {split} split has {len(blocks)} blocks of {self.seq_len} tokens, too few "
                f"for one batch of {batch_size} per process; lower data.batch_size or data.seq_len"
            )
        if len(sampler) == 0:
            raise UserError(
                f"the {split} split has {len(blocks)} blocks of {self.seq_len} tokens, fewer than "
                f"the {world_size} processes; lower data.seq_len or use fewer devices"
            )
        return BatchLoader(
            blocks,
            sampler,
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _stream_loader(self, split: str, train: bool, batch_size: int) -> DataLoader:
        rank, world_size = self._rank_and_world()
        windows = StreamWindows(
            self.tokens[split],
            batch_size,
            self.seq_len,
            pad_last=not train,
            rank=rank,
            world_size=world_size,
            split=split,
        )
        return BatchLoader(
            windows,
            WindowOrder(len(windows)),
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, batch_size=self.eval_batch_size)
