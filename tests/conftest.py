"""Shared fixtures: a small generated corpus and a way to run the entry points."""

# ruff: noqa: E402  (the imports below come after this pytest-xdist worker is pinned to its cores)

from __future__ import annotations

import os


def _pin_this_worker_to_its_cores() -> None:
    """Under pytest-xdist, keep each worker (and every process it starts) on its own cores.

    Unpinned, two workers' torch thread pools and DDP processes spin on the same cores and
    each test runs about twice as slow, which eats most of what the second worker gains.
    Runs before torch is imported, so its thread pool is sized to the cores it is given.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or workers < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    share = cores[int(worker[2:]) % workers :: workers]
    if share:
        os.sched_setaffinity(0, share)


_pin_this_worker_to_its_cores()

import contextlib
import functools
import http.server
import json
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lmlab.lit_module import LanguageModel
from lmlab.models.gpt import GPTConfig

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The `slow` tests first: each worker takes the long runs early and the short tests fill
    the gaps at the end, instead of one worker finishing a DDP run while the other waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order


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


def random_batches(batches: int, vocab: int, seed: int, batch_size: int = 4) -> DataLoader:
    """`batches` batches of random (inputs, targets) blocks of 8 tokens, for in-process trainers."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batches * batch_size, 9), generator=generator)
    return DataLoader([(row[:-1], row[1:]) for row in tokens], batch_size=batch_size)


def tiny_gpt_module(vocab: int, lr: float, scheduler: Any = None) -> LanguageModel:
    """A one-layer GPT LightningModule over a made-up vocabulary, AdamW at `lr`; seeded."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab, block_size=8, n_layer=1, n_head=2, n_embd=16)
    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 2)]
    optimizer = functools.partial(torch.optim.AdamW, lr=lr)
    return LanguageModel(config, words, optimizer=optimizer, scheduler=scheduler)


def quiet_trainer(root: Path, callbacks: list[L.Callback], **options: Any) -> L.Trainer:
    """An in-process Lightning Trainer with no logger, bar, summary or checkpoints of its own."""
    return L.Trainer(
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        **options,
    )


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def trained_run(
    tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path
) -> Path:
    """The folder of one tiny train.py run, shared by the end-to-end tests that need a checkpoint."""
    return train_tiny(tmp_path_factory.mktemp("trained"), corpus_dir, cache_dir, "test=false")


@pytest.fixture(scope="session")
def one_validation_run(
    tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path
) -> Path:
    """One epoch (one validation, then the test) with `trainer.precision=auto`."""
    run_dir = tmp_path_factory.mktemp("one_validation")
    overrides = ["trainer.precision=auto", "trainer.max_epochs=1", "callbacks.samples=null"]
    return train_tiny(run_dir, corpus_dir, cache_dir, *overrides)


def train_tiny(run_dir: Path, corpus: Path, cache: Path, *overrides: str) -> Path:
    """Run train.py with `tiny_overrides` and `overrides` into `run_dir`; it must succeed."""
    result = run_entry_point("train.py", *tiny_overrides(corpus, cache, run_dir), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def evaluate_tiny(checkpoint: Path, corpus: Path, cache: Path, report: Path, *options: str) -> dict:
    """eval.py on the fixture corpus (no BLEU); its JSON report. It must succeed."""
    result = run_entry_point(
        "eval.py",
        f"ckpt={checkpoint}",
        *fixture_data(corpus, cache),
        "bleu.num_sentences=0",
        f"output={report}",
        *options,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(report.read_text())


# What one training run leaves in its folder, and nothing else.
RUN_FOLDER = [
    ".hydra",
    "checkpoints",
    "metrics.jsonl",
    "plots",
    "result.json",
    "samples.md",
    "summary.json",
    "tensorboard",
    "train.log",
]


def write_stored_run(run: Path, output_dir: str, checkpoints: str, global_step: int) -> Path:
    """A minimal run folder as `resume=` reads it: stored config, Hydra record, last.ckpt."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        f"paths:\n  output_dir: {output_dir}\ncallbacks:\n  model_checkpoint:\n"
        "    _target_: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"    dirpath: ${{paths.output_dir}}/{checkpoints}\n"
    )
    (run / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  runtime:\n    output_dir: {run}\n    choices:\n      model: tiny\n"
    )
    (run / checkpoints).mkdir()
    last = run / checkpoints / "last.ckpt"
    torch.save({"global_step": global_step}, last)
    return last


def fixture_data(corpus: Path, cache: Path) -> list[str]:
    """`data=` overrides that read the fixture corpus written by `write_corpus`."""
    return [
        "data=text",
        f"data.data_dir={corpus}",
        "data.files.train=ptb.train.txt",
        "data.files.valid=ptb.valid.txt",
        "data.files.test=ptb.test.txt",
        f"data.cache_dir={cache}",
    ]


def tiny_overrides(corpus: Path, cache: Path, run_dir: Path) -> list[str]:
    """Overrides for a seconds-long run of train.py on the fixture corpus."""
    return [
        "model=tiny",
        *fixture_data(corpus, cache),
        "data.seq_len=16",
        "data.batch_size=8",
        "trainer=cpu",
        "trainer.precision=32-true",  # the same arithmetic on every CPU (auto might pick bf16)
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=5",
        "scheduler.warmup_steps=5",
        "optimizer.lr=1e-2",
        f"hydra.run.dir={run_dir}",
    ]


def python_path(env: dict[str, str]) -> str:
    """PYTHONPATH for a child process: this checkout's src/, and tests/ for the fault callbacks."""
    return os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "tests"), *filter(None, [env.get("PYTHONPATH")])]
    )


_FORK_SERVERS: dict[str, Any] = {}  # script -> forkserver.ForkServer, one per session


@pytest.fixture(scope="session", autouse=True)
def _close_fork_servers() -> Iterator[None]:
    yield
    for server in _FORK_SERVERS.values():  # all told to stop first: they shut down together
        if server.process.stdin is not None:
            server.process.stdin.close()
    for server in _FORK_SERVERS.values():
        server.close()
        shutil.rmtree(server.scratch, ignore_errors=True)


def run_entry_point(
    script: str, *overrides: str, env: dict[str, str] | None = None, timeout: float = 240
) -> Any:
    """Run a root entry point (train.py, generate.py, eval.py) as a user would.

    The run is a fork of a process that imported torch, Lightning and Hydra once
    (tests/forkserver.py): the code path of `python SCRIPT ...`, exit status and
    signals included, without paying seconds of imports in every test. An `env`
    that sets PYTHONPATH gets a new process, since the server imported with the session's.
    """
    if env is not None and "PYTHONPATH" in env:
        full_env = {**os.environ, **env}
        full_env["PYTHONPATH"] = python_path(full_env)
        return subprocess.run(
            [sys.executable, str(ROOT / script), *overrides],
            cwd=ROOT,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if script not in _FORK_SERVERS:
        import tempfile

        from forkserver import ForkServer

        scratch = Path(tempfile.mkdtemp(prefix="lmlab-fork-"))
        _FORK_SERVERS[script] = ForkServer(script, scratch)
    return _FORK_SERVERS[script].run(*overrides, env=env, timeout=timeout)


def console_scripts() -> dict[str, str]:
    """`[project.scripts]` of pyproject.toml: script name -> "module:function"."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def run_console_script(
    name: str, *args: str, cwd: Path | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run console script `name` of this checkout as pip's generated wrapper runs it.

    The wrapper imports the function pyproject names and exits with its result;
    running that here tests this checkout whatever (or whether) lmlab is installed.
    """
    module, _, function = console_scripts()[name].partition(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {function}; sys.exit({function}())"
    env = {**os.environ}
    env["PYTHONPATH"] = python_path(env)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def console_run(
    tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One tiny run of `lmlab-train` from a folder outside the checkout (2 epochs, 2 validations).

    Shared by the tests of what a run writes: record, plots, samples, summary.
    """
    cwd = tmp_path_factory.mktemp("console_run")
    run_dir = cwd / "run"
    overrides = [
        *tiny_overrides(corpus_dir, cache_dir, run_dir),
        "callbacks.samples.max_new_tokens=6",
    ]
    result = run_console_script("lmlab-train", *overrides, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_folder(root: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving `root`; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
