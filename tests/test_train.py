"""train.py end to end through its Hydra entry point, on the fixture corpus."""

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.serialization import get_unsafe_globals_in_checkpoint

from conftest import RUN_FOLDER, fixture_data, run_entry_point, tiny_overrides


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus_dir, cache_dir) -> tuple[Path, str, str]:
    run_dir = tmp_path_factory.mktemp("run")
    result = run_entry_point("train.py", *tiny_overrides(corpus_dir, cache_dir, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout, result.stderr


@pytest.mark.slow
def test_run_writes_safe_self_describing_checkpoints(tiny_run):
    run_dir, _, stderr = tiny_run
    for name in ("best.ckpt", "last.ckpt"):
        path = run_dir / "checkpoints" / name
        assert get_unsafe_globals_in_checkpoint(str(path)) == []
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
        meta = checkpoint["lmlab"]
        assert meta["model_config"]["n_embd"] == 32
        assert meta["vocab"][:2] == ["<eos>", "<unk>"]
        assert meta["model_config"]["vocab_size"] == len(meta["vocab"])
        assert any(k.startswith("model.token_embedding") for k in checkpoint["state_dict"])
    # the readable copies beside the checkpoints are the checkpoint's own metadata
    assert (
        json.loads((run_dir / "checkpoints" / "vocab.json").read_text())["words"] == meta["vocab"]
    )
    assert (
        json.loads((run_dir / "checkpoints" / "model_config.json").read_text())
        == (meta["model_config"])
    )
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    # The readable copies are written after Lightning looks at the folder: a fresh run is not
    # told that its checkpoint folder "exists and is not empty".
    assert "is not empty" not in stderr
    # nor told of torch's LeafSpec deprecation, which Lightning's own code triggers
    assert "LeafSpec" not in stderr


@pytest.mark.slow
def test_run_logs_tensorboard_scalars_and_learns(tiny_run):
    run_dir, stdout, _ = tiny_run
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event files in the run folder"
    tags = set()
    values = {}
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            tags.add(tag)
            values.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    assert {"train/loss", "val/loss", "val/ppl", "test/ppl", "train/lr"} <= tags
    vocab_size = len(
        torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["lmlab"]["vocab"]
    )
    assert values["val/ppl"][-1] < vocab_size / 4  # far better than uniform guessing
    assert values["train/loss"][-1] < values["train/loss"][0]
    assert max(values["train/lr"]) == pytest.approx(1e-2)  # warm-up reached the base LR
    assert "best val/ppl" in stdout and "test/ppl" in stdout


@pytest.mark.slow
def test_artifacts_land_only_in_the_run_folder(tiny_run):
    root = Path(__file__).resolve().parents[1]
    assert not (root / "lightning_logs").exists()
    run_dir, _, _ = tiny_run
    assert sorted(p.name for p in run_dir.iterdir()) == RUN_FOLDER


def test_bad_value_exits_with_one_line_before_training(tmp_path, corpus_dir, cache_dir):
    overrides = tiny_overrides(corpus_dir, cache_dir, tmp_path / "run")
    result = run_entry_point("train.py", *overrides, "model.dropout=1.5")
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1] == "error: model.dropout must be in [0, 1), got 1.5"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_typo_in_a_key_gets_hydras_message(tmp_path, corpus_dir, cache_dir):
    overrides = tiny_overrides(corpus_dir, cache_dir, tmp_path / "run")
    result = run_entry_point("train.py", *overrides, "trainer.max_epoch=3")
    assert result.returncode != 0
    assert "Key 'max_epoch' is not in struct" in result.stderr


@pytest.mark.slow
def test_the_gpu_recipe_trains_a_few_steps_on_cpu(tmp_path, corpus_dir, cache_dir):
    # experiment=ptb_gpu as composed, shrunk: a narrow network, four steps, no time budget,
    # and the weight averaging started after the first step so that it is exercised too
    run = tmp_path / "run"
    result = run_entry_point(
        "train.py", "experiment=ptb_gpu", *fixture_data(corpus_dir, cache_dir),
        "model.n_embd=16", "model.n_hidden=32", "data.seq_len=8", "data.batch_size=4",
        "data.eval_batch_size=4", "trainer.accelerator=cpu", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false",
        "callbacks.budget.seconds=null", "callbacks.averaging.start_step=1",
        "callbacks.samples=null", "logger=csv", f"hydra.run.dir={run}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["lmlab"]["model_config"]["n_layer"] == 3  # the recipe's network
    assert "current_model_state" in best  # validated and saved: the average
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_step"] in (2, 4) and summary["test_ppl"] > 0


@pytest.mark.slow
def test_a_run_without_checkpoint_callbacks_ends_with_its_summary(tmp_path, corpus_dir, cache_dir):
    # callbacks.NAME=null switches a callback off; with both checkpoint callbacks off the
    # first Checkpoint left is lmlab's stop handler, which holds no checkpoint paths
    run = tmp_path / "run"
    result = run_entry_point(
        "train.py", *tiny_overrides(corpus_dir, cache_dir, run), "trainer.max_epochs=1",
        "callbacks.model_checkpoint=null", "callbacks.periodic_checkpoint=null", "logger=none",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_checkpoint"] in ("", None) and summary["test_ppl"] > 0
    assert not list(run.glob("checkpoints/*.ckpt"))
