"""How fast PTB (or a synthetic corpus of any size) is prepared and served.

    python benchmarks/data_speed.py --data-dir ../shared/data/ptb
    python benchmarks/data_speed.py --synthetic-words 100000000 --synthetic-vocab 250000

PTB: preparing cold (empty cache: read with HF datasets, build the vocabulary, encode,
write the cache) and warm (verify checksums, find the cache), each the median of several
fresh data modules in this process; then the training loader's batches per second against
the `small` model's training steps per second, measured in the same run.

--synthetic-words N: a Zipfian corpus of N training words (and N / 100 for validation and
test, at least 1,000), vocabulary --synthetic-vocab, lines of 20 words, written by the
script into a temporary folder; then preparation cold and warm, each in a fresh process,
then the training split's store serving SERVED_BATCHES shuffled batches of 32 blocks of 64
ids, read by position (`lmlab.token_file.TokenFile`, what training uses) against the same
reads from a memory map of the file (the reference), with the file pages each leaves resident
in this process; and a real training run (`python train.py model=small data=text ...`, a few
steps from the store, default precision, sanity validation, callbacks; no logger, no test),
each with its wall time and peak resident memory. The same training run on a corpus of N / 100
words with the same vocabulary (each split starts with every word once, in lines of 20) shows
what of that memory the corpus accounts for; the same run with `optimizer=adafactor`, what
the optimizer's state accounts for. The model's training state is printed beside them
(float32 weights and gradient, and AdamW's two moments: 16 bytes a parameter; 8 with
Adafactor, whose factored second moment is a row and a column per matrix).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from lmlab.data import LMDataModule, TokenBlocks
from lmlab.machine import machine_line
from lmlab.models.gpt import GPTLM, PRESETS, GPTConfig
from lmlab.token_file import TokenFile

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "data" / "ptb.yaml"
TRAIN_STEPS = 5
SERVED_BATCHES = 10_000


def datamodule(data_dir: str, cache_dir: str) -> LMDataModule:
    conf = yaml.safe_load(CONF.read_text())
    return LMDataModule(
        data_dir=data_dir, files=conf["files"], md5=conf["md5"], cache_dir=cache_dir
    )


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


SYNTHETIC = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
LINE_WORDS = 20
CHUNK_LINES = 50_000


def write_synthetic(folder: Path, words: int, vocab: int, seed: int = 0) -> None:
    """Three split files of Zipf-distributed words `w0`, `w1`, ... (p ~ 1 / rank), written in
    chunks, the training split after every word once (so any size has the whole vocabulary)."""
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(1.0 / np.arange(1, vocab + 1))
    cumulative /= cumulative[-1]
    names = np.array([f"w{i}" for i in range(vocab)], dtype=object)
    sizes = {"train": words, "valid": max(1_000, words // 100), "test": max(1_000, words // 100)}
    for split, size in sizes.items():
        with open(folder / SYNTHETIC[split], "w") as f:
            if split == "train":
                for i in range(0, vocab, LINE_WORDS):
                    f.write(" ".join(names[i : i + LINE_WORDS]) + "\n")
            left = size
            while left > 0:
                n = min(left, CHUNK_LINES * LINE_WORDS)
                ranks = np.searchsorted(cumulative, rng.random(n))
                lines = names[np.minimum(ranks, vocab - 1)]
                rows = [" ".join(lines[i : i + LINE_WORDS]) for i in range(0, n, LINE_WORDS)]
                f.write("\n".join(rows) + "\n")
                left -= n


def _child(data_dir: str, cache: str, queue) -> None:
    """In a fresh process: prepare; report (seconds, peak MiB)."""
    start = time.perf_counter()
    dm = LMDataModule(data_dir=data_dir, files=SYNTHETIC, cache_dir=cache, seq_len=64)
    dm.prepare_data()
    dm.setup()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    queue.put((time.perf_counter() - start, peak))


def in_fresh_process(data_dir: str, cache: str) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(data_dir, cache, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def training_run(data_dir: str, cache: str, run_dir: str, *overrides: str) -> tuple[float, float]:
    """`python train.py model=small data=text ...` for TRAIN_STEPS steps, as a user runs it
    (its imports, sanity validation, callbacks, the default precision), with `overrides`;
    (seconds, peak MiB)."""
    files = [f"data.files.{split}={name}" for split, name in SYNTHETIC.items()]
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "model=small",
        "data=text",
        f"data.data_dir={data_dir}",
        *files,
        f"data.cache_dir={cache}",
        f"trainer.max_steps={TRAIN_STEPS}",
        # the training process, not a validation of N / 100 words at its last step
        "callbacks.final_validation=null",
        "trainer.enable_progress_bar=false",
        "test=false",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    log = Path(run_dir).with_suffix(".stderr")  # a file, not a pipe nobody reads while it runs
    start = time.perf_counter()
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak, not the others'
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"train.py failed:\n{log.read_text()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def resident_file_pages_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def serving(store: Path, batches: int = SERVED_BATCHES) -> dict[str, tuple[float, float]]:
    """µs per batch and MiB of file pages left resident, shuffled batches of 32 x 64 ids from
    `store` read by position (TokenFile), then from a memory map of it (the reference)."""
    results = {}
    for name, tokens in (
        ("memory map (reference)", lambda: np.load(store, mmap_mode="r")),
        ("read by position (lmlab)", lambda: TokenFile(store)),
    ):
        blocks = TokenBlocks(tokens(), 64, pad_last=False)
        order = torch.randint(
            0, len(blocks), (batches, 32), generator=torch.Generator().manual_seed(0)
        )
        before = resident_file_pages_mib()
        start = time.perf_counter()
        for index in order.tolist():
            blocks[index]
        seconds = time.perf_counter() - start
        results[name] = (seconds / batches * 1e6, resident_file_pages_mib() - before)
        del blocks  # a memory map gives its pages back when it is closed
    return results


def training_state_mib(vocab_size: int, bytes_per_parameter: int) -> float:
    """The `small` model's training state at `bytes_per_parameter`, in MiB: 16 for float32
    weights, gradient and AdamW's two moments; 8 for Adafactor's (its factored second
    moment is a row and a column per matrix, a few MiB)."""
    with torch.device("meta"):
        model = GPTLM(GPTConfig(vocab_size=vocab_size, block_size=64, **PRESETS["small"]))
    return bytes_per_parameter * sum(p.numel() for p in model.parameters()) / 2**20


def synthetic(words: int, vocab: int) -> None:
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        write_synthetic(Path(folder), words, vocab)
        written = time.perf_counter() - start
        cold = in_fresh_process(folder, cache)
        warm = in_fresh_process(folder, cache)
        (store,) = Path(cache).glob("*/train.npy")
        served = serving(store)
        train = training_run(folder, cache, str(Path(folder) / "run"))
        lean = training_run(folder, cache, str(Path(folder) / "lean"), "optimizer=adafactor")
        (words_file,) = Path(cache).glob("*/vocab.json")
        vocab_size = len(json.loads(words_file.read_text())["words"])
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as cache:
        write_synthetic(Path(folder), words // 100, vocab)
        in_fresh_process(folder, cache)  # prepared first, as for the run above
        small_corpus = training_run(folder, cache, str(Path(folder) / "run"))
    print(machine_line())
    print(f"synthetic Zipfian corpus: {words:,} training words, vocabulary {vocab:,}")
    print(f"{'what':44} {'seconds':>10} {'peak MiB':>10}")
    print("-" * 66)
    print(f"{'writing the corpus (not lmlab)':44} {written:10.2f} {'':>10}")
    for name, (seconds, peak) in (
        ("prepare cold (empty cache), fresh process", cold),
        ("prepare warm (from cache), fresh process", warm),
        (f"train.py model=small, {TRAIN_STEPS} steps (AdamW)", train),
        ("  the same, optimizer=adafactor", lean),
        (f"  AdamW on {words // 100:,} words", small_corpus),
    ):
        print(f"{name:44} {seconds:10.2f} {peak:10.0f}")
    for name, size in (("AdamW: weights, grad, 2 moments", 16), ("Adafactor: weights, grad", 8)):
        print(f"{'  state, ' + name:44} {'':>10} {training_state_mib(vocab_size, size):10.0f}")
    print(f"\nthe training split's store, {SERVED_BATCHES:,} shuffled batches of 32 x 64 ids")
    print(f"{'read from':44} {'us/batch':>10} {'file MiB':>10}")
    print("-" * 66)
    for name, (micros, resident) in served.items():
        print(f"{name:44} {micros:10.0f} {resident:10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data/ptb")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic-words", type=int, default=None)
    parser.add_argument("--synthetic-vocab", type=int, default=250_000)
    args = parser.parse_args()
    if args.synthetic_words is not None:
        synthetic(args.synthetic_words, args.synthetic_vocab)
        return

    def prepare(cache: str) -> None:
        dm = datamodule(args.data_dir, cache)
        dm.prepare_data()
        dm.setup()

    import datasets  # noqa: F401  imported once, as in any run; its import is not data work

    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(timed(lambda cache=cache: prepare(cache)))
            warm.append(timed(lambda cache=cache: prepare(cache)))

    with tempfile.TemporaryDirectory() as cache:
        dm = datamodule(args.data_dir, cache)
        dm.prepare_data()
        dm.setup()
        loader = dm.train_dataloader()
        batches = 0
        start = time.perf_counter()
        for _ in loader:
            batches += 1
        loader_rate = batches / (time.perf_counter() - start)

        model = GPTLM(GPTConfig(vocab_size=len(dm.vocab), block_size=64, **PRESETS["small"]))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        steps = []
        for i, (inputs, targets) in enumerate(loader):
            if i == 12:
                break
            start = time.perf_counter()
            loss = model(inputs, targets=targets)  # the fused loss lmlab trains with
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if i >= 2:
                steps.append(time.perf_counter() - start)
        step_rate = 1 / statistics.median(steps)

    print(machine_line())
    print(f"PTB from {args.data_dir}; median of {args.repeats}")
    print(f"{'what':44} {'value':>12}")
    print("-" * 57)
    print(f"{'prepare cold (empty cache), s':44} {statistics.median(cold):12.3f}")
    print(f"{'prepare warm (from cache), s':44} {statistics.median(warm):12.3f}")
    print(f"{'training loader, batches/s (32 x 64)':44} {loader_rate:12.0f}")
    print(f"{'small model training steps/s':44} {step_rate:12.2f}")
    print(f"{'loader headroom (batches/s per step/s)':44} {loader_rate / step_rate:12.0f}x")


if __name__ == "__main__":
    main()
