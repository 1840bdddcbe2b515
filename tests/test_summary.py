"""Parameter counts per part, and the end-of-run summary against the run's own figures."""

import io
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmlab.models.gpt import GPTLM, GPTConfig
from lmlab.parameters import parameter_counts, parameter_table
from lmlab.summary import RunSummary, generate_command

from conftest import train_tiny


def test_parameter_counts_split_the_model_into_parts():
    config = GPTConfig(vocab_size=50, block_size=8, n_layer=3, n_head=2, n_embd=16)
    model = GPTLM(config)
    counts = parameter_counts(model)
    c, hidden = config.n_embd, config.mlp_ratio * config.n_embd
    assert counts["embeddings"] == (50 + 8) * c  # the tied output layer is not counted again
    assert counts["attention"] == 3 * ((c * 3 * c + 3 * c) + (c * c + c))
    assert counts["mlp"] == 3 * ((c * hidden + hidden) + (hidden * c + c))
    assert counts["norms"] == (2 * 3 + 1) * 2 * c
    assert counts["other"] == 0
    assert sum(counts.values()) == sum({id(p): p.numel() for p in model.parameters()}.values())
    assert counts["embeddings"] == model.token_embedding.weight.numel() + (
        model.position_embedding.weight.numel()
    )

    console = Console(width=120, record=True)
    console.print(parameter_table(model))
    text = console.export_text()
    total = sum(counts.values())
    assert f"{total:,}" in text and f"{total - counts['embeddings']:,}" in text


def test_generate_command_quotes_paths_for_the_shell():
    assert generate_command("runs/a/best.ckpt") == (
        'python generate.py ckpt=runs/a/best.ckpt prompt="the company said"'
    )
    assert generate_command("my runs/best.ckpt", "the market") == (
        "python generate.py 'ckpt=my runs/best.ckpt' prompt=\"the market\""
    )


@pytest.mark.slow
def test_summary_holds_the_real_figures_of_the_run(console_run):
    run_dir, result = console_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert RunSummary.read(run_dir / "summary.json").to_dict() == summary
    cwd = run_dir.parent  # the run's working folder: paths are shown relative to it

    best = cwd / summary["best_checkpoint"]
    last = cwd / summary["last_checkpoint"]
    assert best == run_dir / "checkpoints" / "best.ckpt" and last.is_file()
    last_state = torch.load(last, weights_only=True, map_location="cpu")
    best_state = torch.load(best, weights_only=True, map_location="cpu")
    (score,) = [
        v["best_model_score"]
        for k, v in last_state["callbacks"].items()
        if k.startswith("ModelCheckpoint")
    ]
    assert summary["best_val_ppl"] == pytest.approx(float(score))
    assert summary["best_step"] == best_state["global_step"]
    assert summary["steps"] == last_state["global_step"]
    assert summary["epochs"] == 2 and summary["validations"] == 2
    assert summary["tokens_seen"] == summary["steps"] * 8 * 16

    scalars = {}
    for event_file in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    assert summary["final_val_ppl"] == pytest.approx(scalars["val/ppl"][-1])
    assert summary["best_val_ppl"] == pytest.approx(min(scalars["val/ppl"]))
    assert summary["test_ppl"] == pytest.approx(scalars["test/ppl"][-1])

    assert 0 < summary["train_time_s"] <= summary["wall_time_s"]
    assert summary["tokens_per_s"] == pytest.approx(
        summary["tokens_seen"] / summary["train_time_s"]
    )
    weights = best_state["state_dict"]
    params = sum(
        p.numel() for k, p in weights.items() if k.startswith("model.") and "lm_head" not in k
    )
    assert summary["parameters"] == params
    assert summary["generate_command"] == (
        f'python generate.py ckpt={summary["best_checkpoint"]} prompt="the company said"'
    )
    assert (cwd / summary["curves"]).is_file() and (cwd / summary["samples"]).is_file()

    # the printed table carries the same figures, and the command is on a line of its own
    out = result.stdout
    assert f"{summary['best_val_ppl']:.2f} (step {summary['best_step']:,})" in out
    assert f"{summary['test_ppl']:.2f}" in out and f"{summary['tokens_seen']:,}" in out
    assert f"  {summary['generate_command']}\n" in out


def test_a_summary_without_figures_writes_nulls_and_prints(tmp_path):
    values = dict.fromkeys(f.name for f in fields(RunSummary))
    summary = RunSummary(**values | {"run_dir": "r", "steps": 0, "epochs": 0})
    summary.write(tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text())["test_ppl"] is None
    console = Console(file=io.StringIO(), width=100)
    summary.print(console)
    assert "test/ppl" in console.file.getvalue()


def test_after_testing_the_best_checkpoint_the_summary_still_names_last_ckpt(one_validation_run):
    # trainer.test(ckpt_path=best) hands the callbacks best.ckpt's state back, written
    # before last.ckpt; with a single validation that state knows no last.ckpt yet
    summary = json.loads((one_validation_run / "summary.json").read_text())
    assert summary["validations"] == 1 and summary["test_ppl"] is not None
    assert summary["last_checkpoint"] is not None
    assert Path(summary["last_checkpoint"]).resolve() == (
        one_validation_run / "checkpoints" / "last.ckpt"
    )


@pytest.mark.slow
def test_summary_counts_the_whole_run_when_the_best_checkpoint_is_earlier(
    tmp_path, corpus_dir, cache_dir
):
    # mode=max keeps the first validation's checkpoint as best (perplexity falls after it),
    # and the test then loads that earlier state into every callback
    run_dir = train_tiny(
        tmp_path / "run",
        corpus_dir,
        cache_dir,
        "callbacks.model_checkpoint.mode=max",
        "callbacks.samples=null",
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_step"] < summary["steps"]
    assert summary["tokens_seen"] == summary["steps"] * 8 * 16
    record = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["tokens_seen"] == max(r["tokens"] for r in record if "tokens" in r)
    assert (
        summary["train_time_s"] >= max(r["time_s"] for r in record if r["kind"] == "train") - 1e-3
    )
