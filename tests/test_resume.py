"""Exact resume: a run stopped any way and resumed equals the run never stopped."""

from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from faults import fault_overrides, read_records, record_overrides
from forkserver import ForkServer

from lmlab.data import BatchLoader, BlockBatches, LMDataModule, TokenBlocks, keep_batch
from lmlab.errors import UserError
from lmlab.models import config_from_dict
from lmlab.resume import (
    ResumeState,
    check_resumable,
    resume_argv,
    rng_state,
    set_rng_state,
)

from conftest import evaluate_tiny, run_entry_point, tiny_overrides, train_tiny, write_stored_run


def _loader(num_blocks: int = 40, batch_size: int = 4) -> BatchLoader:
    blocks = TokenBlocks(torch.arange(num_blocks * 8), seq_len=8, pad_last=False)
    sampler = BlockBatches(len(blocks), batch_size, shuffle=True, seed=3)
    return BatchLoader(blocks, sampler, collate_fn=keep_batch)


def _epoch(loader: BatchLoader, epoch: int) -> list[torch.Tensor]:
    loader.sampler.set_epoch(epoch)
    return [inputs for inputs, _ in loader]


def test_loader_epochs_differ_and_repeat() -> None:
    loader = _loader()
    first, second = _epoch(loader, 0), _epoch(loader, 1)
    assert len(first) == len(loader) == 10
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first, _epoch(_loader(), 0), strict=True))


def test_loader_resumes_mid_epoch() -> None:
    loader = _loader()
    expected = _epoch(_loader(), 2)
    loader.sampler.set_epoch(2)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 3}

    resumed = _loader()
    resumed.load_state_dict(state)
    rest = [inputs for inputs, _ in resumed]
    assert len(rest) == 7
    assert all(torch.equal(a, b) for a, b in zip(rest, expected[3:], strict=True))


def test_loader_saved_on_last_batch_continues_with_next_epoch() -> None:
    # The trap: resuming "epoch 0, all its batches served" must not yield an
    # empty epoch (silently skipping one) but the whole of epoch 1.
    loader = _loader()
    _epoch(loader, 0)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": len(loader)}

    resumed = _loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # what Lightning does next; must not reset anything
    rest = [inputs for inputs, _ in resumed]
    expected = _epoch(_loader(), 1)
    assert len(rest) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(rest, expected, strict=True))


def test_rng_state_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = (torch.rand(3), random.random(), np.random.normal(), np.random.rand())

    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    set_rng_state(torch.load(path, weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.normal(), np.random.rand()) == expected[1:]
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []


# -- end to end ---------------------------------------------------------------


def _load(path: Path) -> dict:
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_interrupted_run_equals_uninterrupted_run(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    datamodule = LMDataModule(
        str(corpus_dir),
        {s: f"ptb.{s}.txt" for s in ("train", "valid", "test")},
        seq_len=16,
        batch_size=8,
        cache_dir=str(cache_dir),
    )
    datamodule.setup()
    steps_per_epoch = len(datamodule.train_dataloader())
    assert steps_per_epoch >= 12 and steps_per_epoch % 2 == 0
    every = steps_per_epoch // 2  # a periodic save falls on each epoch's last batch

    server = ForkServer("train.py", tmp_path)

    def train(*extra: str, fault: tuple[str, int] | None = None):
        return server.run(*extra, *fault_overrides(*(fault or (None,))))

    base = [
        *tiny_overrides(corpus_dir, cache_dir, tmp_path / "unused"),
        "model.dropout=0.1",  # dropout masks must continue exactly too
        "logger=csv",
        "test=false",
        f"callbacks.periodic_checkpoint.every_n_train_steps={every}",
    ]
    base = [o for o in base if not o.startswith("hydra.run.dir=")]

    straight = tmp_path / "straight"
    done = train(*base, *record_overrides(tmp_path / "straight.txt"), f"hydra.run.dir={straight}")
    assert done.returncode == 0, done.stderr

    run, record = tmp_path / "stopped", tmp_path / "stopped.txt"
    checkpoints = run / "checkpoints"
    last = checkpoints / "last.ckpt"

    # SIGTERM during step 5: finish it, checkpoint, exit 143
    result = train(*base, *record_overrides(record), f"hydra.run.dir={run}", fault=("sigterm", 5))
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert _load(last)["global_step"] == 5

    # SIGKILL mid-epoch, while the step-`every` checkpoint is being written: the
    # step-5 one survives, and steps 6 to `every` are replayed (identically)
    result = train(f"resume={run}", fault=("kill_in_save", every))
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert "resuming" in result.stdout and "(step 5)" in result.stdout
    assert list(checkpoints.glob(".last.ckpt.*.tmp")), "the unfinished save left no temp file"
    assert _load(last)["global_step"] == 5

    # SIGKILL right after the checkpoint written on epoch 0's last batch
    result = train(f"resume={run}", fault=("sigkill", steps_per_epoch))
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not list(checkpoints.glob(".*.tmp")), "stale temp file not cleaned up"
    assert _load(last)["global_step"] == steps_per_epoch

    # SIGINT mid-epoch, past a periodic checkpoint: finish the step, checkpoint, exit 130
    stop = steps_per_epoch + every + 3
    result = train(f"resume={run}", fault=("sigint", stop))
    assert result.returncode == 128 + signal.SIGINT, result.stderr
    assert _load(last)["global_step"] == stop

    result = train(f"resume={run}")
    assert result.returncode == 0, result.stderr
    server.close()

    expected, got = read_records(tmp_path / "straight.txt"), read_records(record)
    assert got == expected  # every training loss and val/ppl, bit for bit
    train_steps = [step for kind, step in expected if kind == "train"]
    assert train_steps == list(range(1, 2 * steps_per_epoch + 1))

    a, b = _load(straight / "checkpoints" / "last.ckpt"), _load(last)
    assert a["global_step"] == b["global_step"] == 2 * steps_per_epoch
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (straight, run)]
    for key in ("best_val_ppl", "best_step", "final_val_ppl"):
        assert summaries[0][key] == summaries[1][key], key
    assert len(list((run / ".hydra").glob("resume-*"))) == 4


def test_resume_argv_rewrites_to_the_stored_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_stored_run(run, "elsewhere", "ckpts", global_step=7)

    assert resume_argv(["train.py", "seed=1"]) == ["train.py", "seed=1"]
    argv = resume_argv(["train.py", f"resume={run}", "trainer.max_epochs=3"])
    assert argv == [
        "train.py",
        "--config-dir",
        str(run / ".hydra"),
        "--config-name",
        "config",
        "trainer.max_epochs=3",
        f"hydra.run.dir='{run}'",
        f"++resume='{run / 'ckpts' / 'last.ckpt'}'",
    ]
    assert (run / ".hydra" / "resume-1" / "config.yaml").is_file()
    # a checkpoint names its run folder too
    argv = resume_argv(["train.py", f"resume={run / 'ckpts' / 'last.ckpt'}"])
    assert argv[2] == str(run / ".hydra")


FAMILY_RUNS = {
    # weight averaging: the average and the trained weights must both continue exactly, and
    # best.ckpt (the average) must give eval.py the val/ppl that training logged
    "gpt_averaging": [
        "model=tiny",
        "model.dropout=0.1",
        "averaging=ema",
        "callbacks.averaging.decay=0.9",
    ],
    # dropout, attention dropout: their masks must continue exactly; and stochastic weight
    # averaging from step 4 on, before the step-7 checkpoint the run resumes from
    "llama_averaging": [
        "model=llama_tiny",
        "model.dropout=0.1",
        "model.attn_dropout=0.1",
        "averaging=swa",
        "callbacks.averaging.start_step=3",
    ],
    # the contiguous order: the LSTM's carried state must continue exactly too
    "lstm": [
        "model=lstm_tiny",
        "data.order=contiguous",
        "model.dropout=0.1",
        "model.dropout_embedding=0.1",
        "model.weight_drop=0.2",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_RUNS))
def test_every_family_resumes_bit_identically_and_decodes_from_its_checkpoint(
    family: str, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    server = ForkServer("train.py", tmp_path)
    base = [
        *(o for o in tiny_overrides(corpus_dir, cache_dir, tmp_path) if "hydra.run.dir" not in o),
        *FAMILY_RUNS[family],
        "logger=csv",
        "test=false",
        "callbacks.periodic_checkpoint.every_n_train_steps=7",
    ]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = server.run(*base, *record_overrides(tmp_path / "a.txt"), f"hydra.run.dir={straight}")
    assert done.returncode == 0, done.stderr[-3000:]
    # killed after step 9: the step-7 checkpoint is the last; steps 8 and 9 are replayed
    killed = server.run(
        *base,
        *record_overrides(tmp_path / "b.txt"),
        *fault_overrides("sigkill", 9),
        f"hydra.run.dir={stopped}",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = server.run(f"resume={stopped}", *fault_overrides(None))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    server.close()

    expected, got = read_records(tmp_path / "a.txt"), read_records(tmp_path / "b.txt")
    assert got == expected and len(expected) > 20  # every loss and val/ppl, bit for bit
    a = _load(straight / "checkpoints" / "last.ckpt")
    b = _load(stopped / "checkpoints" / "last.ckpt")
    weights = ["state_dict"] + (["current_model_state"] if "averaging" in family else [])
    for key in weights:  # with averaging: the average, and the weights being trained
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])

    best = stopped / "checkpoints" / "best.ckpt"
    generated = run_entry_point(
        "generate.py", f"ckpt={best}", "prompt=the company", "top_k=5", "stop_at_eos=false"
    )
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr[-2000:]
    order = "contiguous" if "data.order=contiguous" in base else "blocks"
    # batch_size: data.eval_batch_size of the run, so the same streams
    report = evaluate_tiny(
        best,
        corpus_dir,
        cache_dir,
        tmp_path / "eval.json",
        "split=valid",
        f"order={order}",
        "batch_size=64",
    )
    # eval.py reproduces the val/ppl training logged for that checkpoint
    validations = [v for (kind, _), v in expected.items() if kind == "val"]
    assert report["ppl"] == pytest.approx(min(validations), rel=1e-4)


@pytest.mark.slow
def test_with_averaging_the_test_and_eval_score_the_saved_average(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    run = train_tiny(
        tmp_path / "run",
        corpus_dir,
        cache_dir,
        "averaging=ema",
        "callbacks.averaging.decay=0.5",
        "callbacks.samples=null",
        "trainer.max_epochs=1",
    )
    best = run / "checkpoints" / "best.ckpt"
    average, trained = _load(best)["state_dict"], _load(best)["current_model_state"]
    assert any(not torch.equal(average[k], trained[k]) for k in average)  # two different copies
    tested = json.loads((run / "summary.json").read_text())["test_ppl"]
    report = evaluate_tiny(
        best, corpus_dir, cache_dir, tmp_path / "eval.json", "split=test", "batch_size=64"
    )
    # train.py's test and eval.py score the same weights: the average saved as state_dict
    assert report["ppl"] == pytest.approx(tested, rel=1e-4)


def test_a_checkpoint_without_lmlabs_resume_state_is_continued_with_a_warning(caplog) -> None:
    callback = ResumeState()
    with caplog.at_level("WARNING", logger="lmlab.resume"):
        callback.on_load_checkpoint(SimpleNamespace(is_global_zero=True), None, {"state_dict": {}})
    assert len(caplog.records) == 1
    assert "has no lmlab_resume entry" in caplog.text and "not an exact continuation" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lmlab.resume"):
        callback.on_load_checkpoint(
            SimpleNamespace(is_global_zero=True), None, {"lmlab_resume": {}}
        )
    assert not caplog.records


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=abc", "error: optimizer.lr must be a number, got 'abc'"),
        (
            "model.n_embd=64",
            "error: the checkpoint {last} has another shape than the config's model: "
            "model.n_embd is 32 there, 64 here; a resumed run keeps its model: drop those overrides",
        ),
        (
            "data.seq_len=8",
            "error: the checkpoint {last} has another shape than the config's model: "
            "model.block_size is 16 there, 8 here (model.block_size follows data.seq_len); a "
            "resumed run keeps its model: drop those overrides",
        ),
    ],
)
def test_a_resume_refused_for_a_bad_override_leaves_the_run_as_it_was(
    override: str, message: str, trained_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)

    def files() -> dict[str, bytes]:  # all but the log, which says what happened
        return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}

    before = files()
    del before["train.log"]
    result = run_entry_point("train.py", f"resume={run}", override)
    assert result.returncode == 2
    last = (run / "checkpoints" / "last.ckpt").resolve()
    assert result.stderr.strip().splitlines()[-1] == message.format(last=last)
    # Hydra had written the refused config over the run's, and the run a failed result.json:
    # both are put back and .hydra/resume-N removed, so a plain resume= works again
    after = files()
    del after["train.log"]
    assert after == before


def test_data_with_another_vocabulary_than_the_checkpoints_is_refused(trained_run: Path) -> None:
    last = trained_run / "checkpoints" / "last.ckpt"
    meta = torch.load(last, weights_only=True, mmap=True)["lmlab"]
    config, words = config_from_dict(meta["model_config"]), meta["vocab"]
    check_resumable(last, config, words)  # the run's own data and model
    with pytest.raises(
        UserError, match=rf"vocabulary of {len(words)} tokens, this run's data gives 3"
    ):
        check_resumable(last, config, ["<eos>", "<unk>", "w"])
