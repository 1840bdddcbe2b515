"""Curves from runs' records: the series behind the figure, the PNG, and python -m lmlab.plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.plot import find_runs, main, plot_curves, run_label
from lmlab.record import load_curves

from conftest import ROOT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_record(run_dir: Path, records: list[dict], overrides: list[str] | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if overrides is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return run_dir


def train(step: int, loss: float, lr: float = 1e-3) -> dict:
    return {"kind": "train", "step": step, "tokens": 100 * step, "train/loss": loss, "train/lr": lr}


def val(step: int, ppl: float) -> dict:
    return {"kind": "val", "step": step, "tokens": 100 * step, "val/ppl": ppl, "val/loss": 0.0}


def best(score: float, monitor: str = "val/ppl") -> dict:
    return {"kind": "best", "monitor": monitor, "score": score, "checkpoint": "c/best.ckpt"}


def test_curves_hold_the_recorded_series_and_the_best_checkpoint(tmp_path):
    records = [train(s, 5.0 - s / 10) for s in range(1, 7)]
    records[3:3] = [val(3, 40.0)]
    records += [val(6, 30.0), best(30.0)]
    curves = load_curves(write_record(tmp_path / "run", records))
    assert curves.label == "run"
    assert curves.train_step == [1, 2, 3, 4, 5, 6]
    assert curves.train_tokens == [100, 200, 300, 400, 500, 600]
    assert curves.train_loss == pytest.approx([4.9, 4.8, 4.7, 4.6, 4.5, 4.4])
    assert curves.val_step == [3, 6] and curves.val_ppl == [40.0, 30.0]
    assert (curves.best_step, curves.best_tokens, curves.best_ppl) == (6, 600, 30.0)
    assert curves.best_checkpoint == "c/best.ckpt"


def test_best_is_the_first_validation_reaching_the_monitored_score(tmp_path):
    records = [val(1, 9.0), val(2, 7.0), val(3, 7.0), val(4, 8.0), best(7.0)]
    assert load_curves(write_record(tmp_path / "run", records)).best_step == 2


def test_records_after_a_resume_replace_the_steps_they_repeat(tmp_path):
    # Crashed after step 4, resumed from the checkpoint of step 2: steps 3-4 are run again.
    records = [train(1, 5.0), train(2, 4.0), val(2, 50.0), train(3, 3.0), train(4, 2.0)]
    records += [train(3, 3.5), train(4, 2.5), val(4, 20.0)]
    curves = load_curves(write_record(tmp_path / "run", records))
    assert curves.train_step == [1, 2, 3, 4]
    assert curves.train_loss == [5.0, 4.0, 3.5, 2.5]
    assert curves.val_step == [2, 4]


def test_a_sweep_folder_stands_for_its_jobs_in_order_labelled_by_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    for job in (0, 2, 10):
        write_record(sweep / str(job), [train(1, 1.0)], overrides=[f"optimizer.lr={job}e-3"])
    (sweep / "multirun.yaml").write_text("{}\n")
    runs = find_runs([sweep])
    assert [r.name for r in runs] == ["0", "2", "10"]
    assert run_label(runs[2], sweep) == "sweep/10: optimizer.lr=10e-3"
    assert run_label(runs[0], runs[0]) == "0"


def test_figure_is_a_png(tmp_path):
    first = load_curves(write_record(tmp_path / "a", [train(1, 2.0), val(1, 9.0), best(9.0)]))
    second = load_curves(write_record(tmp_path / "b", [train(1, 3.0), train(2, 2.5)]))
    out = plot_curves([first, second], tmp_path / "plots" / "curves.png")
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_command_line_overlays_runs_and_sweeps(tmp_path, capsys):
    write_record(tmp_path / "run", [train(1, 2.0), val(1, 9.0)])
    write_record(tmp_path / "sweep" / "0", [train(1, 2.0)])
    write_record(tmp_path / "sweep" / "1", [train(1, 2.0)])
    out = tmp_path / "overlay.png"
    main([str(tmp_path / "run"), str(tmp_path / "sweep"), "-o", str(out)])
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert f"wrote {out} (3 runs)" in capsys.readouterr().out


def test_command_line_refuses_a_folder_without_records(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: no metrics.jsonl in or below {tmp_path}: pass run folders of train.py"
    )


def test_command_line_output_is_a_png_and_a_folder_gets_curves_png(tmp_path, capsys):
    run = write_record(tmp_path / "run", [train(1, 2.0), val(1, 9.0)])
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"weights")
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "-o", str(checkpoint)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: -o must name a .png file, got {checkpoint}; e.g. -o plots/curves.png"
    )
    assert checkpoint.read_bytes() == b"weights"
    folder = tmp_path / "plots"
    folder.mkdir()
    main([str(run), "-o", str(folder)])
    assert (folder / "curves.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.slow
def test_module_plots_a_real_run(console_run, tmp_path):
    run_dir, _ = console_run
    out = tmp_path / "curves.png"
    result = subprocess.run(
        [sys.executable, "-m", "lmlab.plot", str(run_dir), "-o", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes().startswith(PNG_SIGNATURE)
