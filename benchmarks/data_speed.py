"""How fast PTB is prepared and served, against what a training step consumes.

    python benchmarks/data_speed.py --data-dir ../shared/data/ptb

Prints: preparing PTB cold (empty cache: read with HF datasets, build the vocabulary,
encode, write the cache) and warm (verify checksums, find the cache), each the median of
several fresh data modules in this process; then the training loader's batches per second
against the `small` model's training steps per second, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from lmlab.data import LMDataModule
from lmlab.models.gpt import GPTLM, PRESETS, GPTConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "data" / "ptb.yaml"


def datamodule(data_dir: str, cache_dir: str) -> LMDataModule:
    conf = yaml.safe_load(CONF.read_text())
    return LMDataModule(
        data_dir=data_dir, files=conf["files"], md5=conf["md5"], cache_dir=cache_dir
    )


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data/ptb")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

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

    print(f"PTB from {args.data_dir}; median of {args.repeats}; torch {torch.__version__}")
    print(f"{'what':44} {'value':>12}")
    print("-" * 57)
    print(f"{'prepare cold (empty cache), s':44} {statistics.median(cold):12.3f}")
    print(f"{'prepare warm (from cache), s':44} {statistics.median(warm):12.3f}")
    print(f"{'training loader, batches/s (32 x 64)':44} {loader_rate:12.0f}")
    print(f"{'small model training steps/s':44} {step_rate:12.2f}")
    print(f"{'loader headroom (batches/s per step/s)':44} {loader_rate / step_rate:12.0f}x")


if __name__ == "__main__":
    main()
