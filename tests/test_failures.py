"""Bad input stops before any work with one line; failures mid-run never lose the run.

`test_bad_input` runs every row of the table in docs/failures.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from faults import fault_overrides, read_records, record_overrides
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf.errors import OmegaConfBaseException

from lmlab.checkpoint import export
from lmlab.config import check_train_config, instantiate_each
from lmlab.download import file_digest
from lmlab.errors import UserError
from lmlab.failsafe import AtomicCheckpointIO, prepare_checkpoint_dirs
from lmlab.finetune import freeze, initialise_from
from lmlab.models import build_model
from lmlab.models.gpt import GPTConfig
from lmlab.resume import resume_argv
from lmlab.tokenizers import Tokenizer
from lmlab.vocab import Vocabulary

from conftest import ROOT, run_entry_point, tiny_overrides, write_stored_run

ROW = re.compile(r"^\| `(?P<input>.+)` \| (?P<exit>\d) \| `(?P<message>.+)` \|$")


def _table() -> list[tuple[str, int, str]]:
    text = (ROOT / "docs" / "failures.md").read_text()
    section = text.split("## Bad input", 1)[1]
    rows = [ROW.match(line) for line in section.splitlines() if line.startswith("| `")]
    assert rows and all(rows), "a row of the bad-input table does not parse"
    return [(row["input"], int(row["exit"]), row["message"]) for row in rows]


@pytest.fixture(scope="module")
def places(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What the table's <placeholders> stand for, made once for every row."""
    tmp = tmp_path_factory.mktemp("bad-input")
    corpus = tmp / "corpus"
    shutil.copytree(corpus_dir, corpus)
    (corpus / "empty.txt").write_text("")
    train = (corpus / "ptb.train.txt").read_bytes()
    (corpus / "truncated.txt").write_bytes(train[: len(train) // 2])
    plain_file = tmp / "plain-file"
    plain_file.write_text("not a folder\n")

    run = tmp / "run"
    write_stored_run(run, "x", "checkpoints", global_step=3)
    (run / "checkpoints" / "broken.ckpt").write_bytes(b"PK\x03\x04 cut short")
    empty_run = tmp / "empty_run"
    shutil.copytree(run / ".hydra", empty_run / ".hydra")
    pickled = tmp / "pickled.ckpt"
    torch.save({"state_dict": {}, "where": Path("x")}, pickled)  # a pathlib object: pickled
    words = Vocabulary.build((corpus / "ptb.train.txt").read_text().splitlines()).words
    tiny = GPTConfig(vocab_size=len(words), block_size=16, n_layer=2, n_head=2, n_embd=32)
    exported = export(build_model(tiny), Tokenizer(Vocabulary(words)), tmp / "exported")
    corrupt_run = tmp / "corrupt_run"
    write_stored_run(corrupt_run, "x", "checkpoints", global_step=3)
    (corrupt_run / ".hydra" / "config.yaml").write_text("paths: [output_dir: x\n")

    return {
        "<corpus>": str(corpus),
        "<tmp>": str(tmp),
        "<file>": str(plain_file),
        "<run>": str(run),
        "<empty_run>": str(empty_run),
        "<corrupt_run>": str(corrupt_run),
        "<pickled>": str(pickled),
        "<exported>": str(exported),
        "<train_md5>": file_digest(corpus / "ptb.train.txt"),
        "<truncated_md5>": file_digest(corpus / "truncated.txt"),
    }


def _fill(text: str, places: dict[str, str]) -> str:
    for name, value in places.items():
        text = text.replace(name, value)
    return text


def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def train_checks(overrides: list[str], places: dict[str, str], cache: Path) -> None:
    """What train.py does before its first training step, in its order, in-process."""
    argv = resume_argv(["train.py", *overrides])
    assert argv == ["train.py", *overrides], "this resume should have been refused"
    base = tiny_overrides(Path(places["<corpus>"]), cache, Path(places["<tmp>"]) / "out")
    base += [f"paths.output_dir={places['<tmp>']}/out"]
    keys = {_key(o) for o in overrides}
    # a row that picks another scheduler (epoch_decay) drops the base's warm-up setting,
    # which that schedule does not have
    other_scheduler = "scheduler" in keys
    merged = [
        o
        for o in base
        if _key(o) not in keys
        and _key(o) != "hydra.run.dir"
        and not (other_scheduler and _key(o).startswith("scheduler."))
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*merged, *overrides])
    check_train_config(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.train_dataloader()  # what fit() builds first
    model = build_model(instantiate(cfg.model, vocab_size=len(datamodule.vocab)))
    if cfg.init_from:
        initialise_from(model, datamodule.tokenizer, cfg.init_from)
    freeze(model, list(cfg.finetune.freeze))
    prepare_checkpoint_dirs(instantiate_each(cfg, "callbacks"))


@pytest.mark.parametrize("row", _table(), ids=lambda row: row[0])
def test_bad_input(row: tuple[str, int, str], places: dict[str, str], cache_dir: Path) -> None:
    command_line, exit_code, message = row
    pattern = re.escape(_fill(message, places)).replace("…", ".+")
    with pytest.raises((UserError, HydraException, OmegaConfBaseException)) as error:
        train_checks(_fill(command_line, places).split(), places, cache_dir)
    if isinstance(error.value, UserError):
        assert exit_code == 2
        assert re.fullmatch(pattern, f"error: {error.value}"), f"error: {error.value}"
    else:  # Hydra's own message: its first line
        assert exit_code == 1
        assert re.fullmatch(pattern, str(error.value).splitlines()[0]), str(error.value)


def test_slurm_trainer_composes(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=slurm", f"paths.output_dir={tmp_path}"])
    check_train_config(cfg)
    (plugin,) = instantiate(cfg.trainer.plugins)
    assert plugin.auto_requeue and plugin.requeue_signal.name == "SIGUSR1"


# -- end to end ---------------------------------------------------------------


@pytest.mark.slow
def test_unwritable_checkpoint_folder_stops_before_training(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"  # root ignores permissions, not a file in the path
    blocker.write_text("")
    run = tmp_path / "run"
    result = run_entry_point(
        "train.py",
        *tiny_overrides(corpus_dir, cache_dir, run),
        f"callbacks.periodic_checkpoint.dirpath={blocker}/checkpoints",
        *record_overrides(tmp_path / "record.txt"),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint folder {blocker}/checkpoints is not writable: Not a directory"
    )
    assert not (tmp_path / "record.txt").exists()  # not one training step


@pytest.mark.slow
def test_nan_loss_stops_without_a_nan_checkpoint(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    result = run_entry_point(
        "train.py",
        *tiny_overrides(corpus_dir, cache_dir, run),
        "logger=csv",
        "callbacks.periodic_checkpoint.every_n_train_steps=4",
        *fault_overrides("nan", 7),
    )
    last = run / "checkpoints" / "last.ckpt"
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: training loss is nan at step 7; stopped before that state was saved "
        f"(the last good checkpoint is {last}); lower optimizer.lr and train again"
    )
    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in checkpoints] == ["last.ckpt"]
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4
    assert all(t.isfinite().all() for t in state["state_dict"].values() if t.is_floating_point())


# -- checkpoint files -----------------------------------------------------------


def _checkpoint(value: float, step: int = 1) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((3,), value)}}


def test_checkpoint_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(_checkpoint(1.0), path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device; the previous one is intact"):
        io.save_checkpoint(_checkpoint(2.0, step=2), path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["state_dict"]["w"].tolist() == [1.0] * 3


def test_non_finite_weights_are_never_written(tmp_path: Path) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(_checkpoint(1.0), path)
    with pytest.raises(UserError, match="weights are not finite at step 2 \\(w\\)"):
        io.save_checkpoint(_checkpoint(float("nan"), step=2), path)
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_finite_weights_whose_sum_overflows_are_written_and_one_infinity_is_not(
    tmp_path: Path,
) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(_checkpoint(3e38), path)  # finite, but their float32 sum is inf
    assert torch.load(path, weights_only=True)["state_dict"]["w"].isfinite().all()
    with pytest.raises(UserError, match="weights are not finite at step 2 \\(w\\)"):
        io.save_checkpoint(_checkpoint(float("inf"), step=2), path)


def test_stale_temporary_checkpoints_are_removed_before_training(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".last.ckpt.0123abcd.tmp").write_bytes(b"")
    (folder / "notes.tmp").write_text("not ours")

    class Callback:
        dirpath = str(folder)

    prepare_checkpoint_dirs([Callback()])
    assert sorted(p.name for p in folder.iterdir()) == ["notes.tmp"]


def _fake_slurm_commands(folder: Path) -> Path:
    """`scontrol` and `sbatch` that only append their arguments to folder/calls.txt."""
    folder.mkdir()
    for name in ("scontrol", "sbatch"):
        command = folder / name
        command.write_text(f'#!/bin/sh\necho "{name} $*" >> "{folder / "calls.txt"}"\n')
        command.chmod(0o755)
    return folder / "calls.txt"


@pytest.mark.slow
def test_slurm_requeue_signal_checkpoints_requeues_and_the_requeued_job_continues_exactly(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    from forkserver import ForkServer

    calls = _fake_slurm_commands(tmp_path / "bin")
    slurm = {  # what a job of one task sees (sbatch --ntasks=1)
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
    }
    base = [
        *(o for o in tiny_overrides(corpus_dir, cache_dir, tmp_path) if o != "trainer=cpu"),
        "trainer=slurm",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "model.dropout=0.1",  # dropout masks must continue exactly too
        "test=false",
    ]
    base = [o for o in base if not o.startswith("hydra.run.dir=")]
    server = ForkServer("train.py", tmp_path)
    straight = tmp_path / "straight"
    done = server.run(
        *base, *record_overrides(tmp_path / "straight.txt"), f"hydra.run.dir={straight}", env=slurm
    )
    assert done.returncode == 0, done.stderr[-3000:]

    # the job's command, as the batch script runs it on every (re)start
    run, record = tmp_path / "slurm-4242", tmp_path / "requeued.txt"
    job = [*base, *record_overrides(record), f"hydra.run.dir={run}", *fault_overrides("sigusr1", 6)]
    warned = server.run(*job, env=slurm)  # SIGUSR1 during step 6: SLURM's warning
    assert warned.returncode == 128 + signal.SIGUSR1, warned.stderr[-3000:]
    assert (
        "stopped after step 6; checkpoint "
        f"{run / 'hpc_ckpt_1.ckpt'}; requeued SLURM job 4242" in warned.stderr
    )
    assert calls.read_text() == "scontrol requeue 4242\n"
    assert torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 6

    requeued = server.run(*job, env={**slurm, "SLURM_RESTART_COUNT": "1"})
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert (
        f"Restored all states from the checkpoint at {run / 'hpc_ckpt_1.ckpt'}"
        in requeued.stdout + requeued.stderr
    )
    server.close()

    assert calls.read_text() == "scontrol requeue 4242\n"  # once: the job then finished
    expected, got = read_records(tmp_path / "straight.txt"), read_records(record)
    assert got == expected  # every training loss and val/ppl, bit for bit
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] > 6
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
