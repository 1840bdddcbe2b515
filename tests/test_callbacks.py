"""Callbacks: the run's record and plot, sample text, progress bar and parameter table.

The end-to-end checks read the shared tiny run of `lmlab-train` (`console_run`)
and compare what the callbacks wrote with the checkpoints and TensorBoard.
"""

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmlab.callbacks import ParameterSummary, ProgressBar
from lmlab.config import instantiate_each
from lmlab.lit_module import LanguageModel
from lmlab.models.gpt import GPTConfig
from lmlab.record import load_curves
from lmlab.recorder import RunRecorder
from lmlab.samples import SampleText

CONF = Path(__file__).resolve().parents[1] / "conf"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_STEP = 8 * 16  # tiny_overrides: data.batch_size=8, data.seq_len=16
WORDS = ["<eos>", "<unk>", "the", "company", "said", "market", *[f"w{i}" for i in range(30)]]


def tensorboard(run_dir: Path) -> tuple[dict[str, list], set[str]]:
    """Scalars (tag -> [(step, value)]) and the tags of text summaries."""
    scalars: dict[str, list] = {}
    texts = set()
    for event_file in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
        for tag in accumulator.Tags()["tensors"]:
            texts.add(tag)
            scalars.setdefault(tag, []).extend((e.step, None) for e in accumulator.Tensors(tag))
    return scalars, texts


def checkpoint_best_score(path: Path) -> float:
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint")]
    return float(state["best_model_score"])


def tiny_module(dropout: float = 0.0) -> LanguageModel:
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=len(WORDS), block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=dropout
    )
    return LanguageModel(config, WORDS, optimizer=torch.optim.AdamW)


# -- sample text ----------------------------------------------------------------


def test_samples_repeat_with_the_seed_and_leave_the_global_rng_alone(tmp_path):
    module = tiny_module(dropout=0.5).train()
    prompts = ["the company said", "zebra market"]
    callback = SampleText(str(tmp_path), prompts=prompts, max_new_tokens=8, top_k=10, seed=3)
    rng_before = torch.get_rng_state()
    first = callback.continuations(module)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert module.training and module.model.blocks[0].mlp.dropout.training  # mode restored
    assert callback.continuations(module) == first
    assert [row["prompt"] for row in first] == ["the company said", "zebra market"]
    for row in first:
        assert len(row["greedy"].split()) == len(row["sampled"].split()) == 8
    other_seed = SampleText(str(tmp_path), prompts=prompts, max_new_tokens=8, top_k=10, seed=4)
    rows = other_seed.continuations(module)
    assert [r["greedy"] for r in rows] == [r["greedy"] for r in first]
    assert [r["sampled"] for r in rows] != [r["sampled"] for r in first]


def test_sample_settings_are_checked():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SampleText("out", temperature=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        SampleText("out", max_new_tokens=0)
    # when the callback is made, not at the first validation an epoch later
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 2"):
        SampleText("out", top_p=2)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
        SampleText("out", top_k=0)


# -- configuration ----------------------------------------------------------------


def compose_callbacks(overrides: list[str], tmp_path: Path) -> list:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}"])
    return instantiate_each(cfg, "callbacks")


def test_progress_bar_and_parameter_table_follow_the_trainer_flags(tmp_path):
    kinds = {type(cb) for cb in compose_callbacks([], tmp_path)}
    assert {ProgressBar, ParameterSummary, RunRecorder, SampleText} <= kinds
    off = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    kinds = {type(cb) for cb in compose_callbacks(off, tmp_path)}
    assert ProgressBar not in kinds and ParameterSummary not in kinds
    assert SampleText not in {
        type(cb) for cb in compose_callbacks(["callbacks.samples=null"], tmp_path)
    }


def test_sample_prompts_come_from_the_config(tmp_path):
    (samples,) = [
        cb
        for cb in compose_callbacks(
            ["callbacks.samples.prompts=[a b,c]", "callbacks.samples.max_new_tokens=5"], tmp_path
        )
        if isinstance(cb, SampleText)
    ]
    assert samples.prompts == ["a b", "c"] and samples.max_new_tokens == 5
    assert samples.samples_path == tmp_path / "samples.md"


# -- what the shared tiny run wrote ---------------------------------------------------


@pytest.mark.slow
def test_record_matches_the_checkpoints_and_tensorboard(console_run):
    run_dir, _ = console_run
    curves = load_curves(run_dir)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    steps = last["global_step"]
    # every optimizer step, in order, with the tokens of full batches
    assert curves.train_step == list(range(1, steps + 1))
    assert curves.train_tokens == [s * TOKENS_PER_STEP for s in curves.train_step]
    assert last["callbacks"]["RunRecorder"]["tokens_seen"] == steps * TOKENS_PER_STEP

    scalars, _ = tensorboard(run_dir)
    # Lightning's loggers put step s at s - 1 (the index of the step, not steps done).
    tb_val = scalars["val/ppl"]
    assert len(curves.val_ppl) == len(tb_val) == 2
    assert curves.val_step == [s + 1 for s, _ in tb_val]
    assert curves.val_ppl == pytest.approx([v for _, v in tb_val])
    # train/ scalars come from the steps whose logs Lightning writes (every 5th: conftest's
    # trainer.log_every_n_steps, and the last, where the run stops to validate), each with
    # that step's own loss and learning rate
    logged_steps = [step + 1 for step, _ in scalars["train/loss"]]
    assert steps % 5 and logged_steps == [s for s in curves.train_step if s % 5 == 0] + [steps]
    recorded = dict(zip(curves.train_step, curves.train_loss))
    for step, value in scalars["train/loss"]:
        assert recorded[step + 1] == pytest.approx(value, rel=1e-5)
    lrs = dict(zip(curves.train_step, curves.lr))
    for step, value in scalars["train/lr"]:
        assert lrs[step + 1] == pytest.approx(value, rel=1e-5)

    # the best checkpoint is marked at the lowest val/ppl, where it was saved
    best_ckpt = run_dir / "checkpoints" / "best.ckpt"
    assert curves.best_ppl == min(curves.val_ppl)
    assert curves.best_ppl == pytest.approx(checkpoint_best_score(best_ckpt))
    best = torch.load(best_ckpt, weights_only=True, map_location="cpu")
    assert curves.best_step == best["global_step"]
    assert Path(curves.best_checkpoint) == best_ckpt


@pytest.mark.slow
def test_run_plots_its_curves(console_run):
    run_dir, _ = console_run
    assert (run_dir / "plots" / "curves.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.slow
def test_samples_hold_one_entry_per_validation(console_run):
    run_dir, _ = console_run
    curves = load_curves(run_dir)
    text = (run_dir / "samples.md").read_text()
    headings = re.findall(r"^## step (\d+) · val/ppl ([\d.]+)$", text, flags=re.M)
    assert [int(step) for step, _ in headings] == curves.val_step
    assert [float(ppl) for _, ppl in headings] == [round(p, 2) for p in curves.val_ppl]
    entries = text.split("\n## ")[1:]
    for entry in entries:
        assert "**the company said**" in entry
        assert entry.count("- greedy: ") == entry.count("- sampled: ") == 3
    scalars, texts = tensorboard(run_dir)
    assert "samples/text_summary" in texts
    assert [step for step, _ in scalars["samples/text_summary"]] == curves.val_step
