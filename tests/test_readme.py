"""Every command in README.md's runnable blocks runs as written, with tiny settings appended.

A fenced block right after an HTML comment starting `<!-- runnable` is runnable. Each
command runs on the real PTB (../shared/data/ptb, which CI has) with a 1-layer model and
two optimizer steps appended as overrides, so it exercises exactly the code path the README
promises, in seconds. `CKPT` stands for a checkpoint of such a tiny run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from forkserver import ForkServer
from hydra import compose, initialize_config_dir
from hydra.utils import get_class

from conftest import ROOT, run_console_script

PTB = ROOT.parent / "shared" / "data" / "ptb"
README_PTB = "../shared/data/ptb"
BLOCK = re.compile(r"<!-- runnable[^>]*-->\s*```bash\n(.*?)```", re.S)


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [
        line.strip()
        for block in BLOCK.findall(text)
        for line in block.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


COMMANDS = readme_commands()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (PTB / "ptb.train.txt").is_file(), reason="no local PTB copy"),
]


TINY_SHAPES = {  # one layer, width 16, for the family the command picks
    "gpt": ["model.n_layer=1", "model.n_embd=16", "model.n_head=2"],
    "llama": ["model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.n_kv_head=1"],
    "lstm": ["model.n_layer=1", "model.n_embd=16", "model.n_hidden=16"],
}


def family_of(args: list[str]) -> str:
    """The model family a train.py command line composes."""
    choices = [  # a sweep's first value stands for all of its values' family
        a.split(",")[0] for a in args if a.split("=")[0] in ("model", "experiment")
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=choices)
    return get_class(cfg.model._target_)().family


def tiny_training(
    tmp: Path, name: str, multirun: bool, cache: Path, family: str = "gpt"
) -> list[str]:
    folder = ("hydra.sweep.dir=" if multirun else "hydra.run.dir=") + str(tmp / name)
    return [
        *TINY_SHAPES[family],
        "data.seq_len=64",
        "data.batch_size=4",
        "data.eval_batch_size=32",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false",
        "callbacks.samples.max_new_tokens=2",
        f"data.cache_dir={cache}",  # PTB is encoded once for every command, as for a user
        f"paths.log_dir={tmp / 'outputs'}",
        folder,
    ]


def as_run(
    command: str, tmp: Path, name: str, ckpt: Path | None, cache: Path
) -> tuple[str, list[str]]:
    """(program, arguments): the README's command with paths and tiny settings filled in."""
    words = shlex.split(command, comments=True)
    program, args = (words[1], words[2:]) if words[0] == "python" else (words[0], words[1:])
    args = [a.replace(README_PTB, str(PTB)).replace("CKPT", str(ckpt)) for a in args]
    if program in ("train.py", "lmlab-train"):
        if not any(a.startswith("data.data_dir=") for a in args):
            args.append(f"data.data_dir={PTB}")  # the README's first command downloads it
        family = family_of(args)
        args += tiny_training(tmp, name, multirun="-m" in args, cache=cache, family=family)
    elif program in ("generate.py", "lmlab-generate"):
        args.append("max_new_tokens=3")
    elif program == "eval.py":
        args += [
            f"data.cache_dir={cache}",
            "bleu.num_sentences=2",
            f"output={tmp / name}.json",
        ]
    return program, args


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("servers")
    started = {
        script: ForkServer(script, scratch) for script in ("train.py", "generate.py", "eval.py")
    }
    yield started
    for server in started.values():
        server.close()


@pytest.fixture(scope="module")
def ptb_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ptb_cache")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, servers, ptb_cache) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    args = tiny_training(tmp, "run", False, cache=ptb_cache)
    result = servers["train.py"].run(f"data.data_dir={PTB}", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run" / "checkpoints" / "best.ckpt"


def test_readme_has_runnable_commands_for_every_entry_point():
    programs = {
        words[1] if words[0] == "python" else words[0]
        for words in (shlex.split(c, comments=True) for c in COMMANDS)
    }
    assert {"train.py", "generate.py", "eval.py", "lmlab-train", "lmlab-generate"} <= programs


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[c[:70] for c in COMMANDS])
def test_readme_command_runs(index, tmp_path, servers, tiny_ckpt, ptb_cache):
    program, args = as_run(COMMANDS[index], tmp_path, f"cmd{index}", tiny_ckpt, ptb_cache)
    if program in servers and "trainer.devices=2" not in args:
        result = servers[program].run(*args)
    else:  # console scripts, and DDP (which starts processes of its own), as real processes
        result = run_console_script(program, *args) if program.startswith("lmlab-") else None
        if result is None:
            from conftest import run_entry_point

            result = run_entry_point(program, *args)
    assert result.returncode == 0, f"{COMMANDS[index]}\n{result.stderr[-3000:]}"
    if program in ("generate.py", "lmlab-generate"):
        assert result.stdout.strip(), "generate printed nothing"
