"""Shared fixtures: a small generated corpus and a way to run the entry points."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(folder: Path, seed: int = 0, lines: tuple[int, int, int] = (400, 60, 70)) -> Path:
    """A PTB-like corpus: lower-case words, one sentence per line, a leading space."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(60)] + ["the", "company", "said", "N", "<unk>"]
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in zip(("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"), lines):
        sentences = []
        for _ in range(count):
            # a little structure (bigram-ish) so a model has something to learn
            length = rng.randint(3, 12)
            start = rng.randrange(len(words))
            sentence = [words[(start + 3 * j) % len(words)] for j in range(length)]
            sentences.append(" " + " ".join(sentence) + " ")
        (folder / name).write_text("\n".join(sentences) + "\n")
    return folder


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_overrides(corpus: Path, cache: Path, run_dir: Path) -> list[str]:
    """Overrides for a seconds-long run of train.py on the fixture corpus."""
    return [
        "model=tiny",
        "data=text",
        f"data.data_dir={corpus}",
        "data.files.train=ptb.train.txt",
        "data.files.valid=ptb.valid.txt",
        "data.files.test=ptb.test.txt",
        f"data.cache_dir={cache}",
        "data.seq_len=16",
        "data.batch_size=8",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=5",
        "scheduler.warmup_steps=5",
        f"hydra.run.dir={run_dir}",
    ]


def run_entry_point(
    script: str, *overrides: str, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run a root entry point (train.py, generate.py, eval.py) as a user would."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [full_env.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
