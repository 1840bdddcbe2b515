"""Sweeps: result.json per job, failed jobs, the summary (CSV, Markdown, PNG), Optuna search."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lmlab.result import write_result
from lmlab.sweep import collect, write_summary

from conftest import ROOT, run_entry_point, tiny_overrides


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _fake_job(sweep: Path, job: int, overrides: list[str], ppl: float | None) -> None:
    write_result(
        sweep / str(job),
        {
            "status": "completed" if ppl is not None else "failed",
            "error": None if ppl is not None else "boom",
            "best_val_ppl": ppl if ppl is not None else math.nan,
            "test_ppl": ppl + 1 if ppl is not None else math.nan,
            "steps": 10,
            "wall_time_s": 1.5,
            "overrides": ["model=tiny", *overrides],
            "job": job,
        },
    )


def test_summary_groups_seeds_and_marks_failed_and_missing_jobs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    values = {("1e-3", 1): 100.0, ("1e-3", 2): 110.0, ("3e-4", 1): 120.0, ("3e-4", 2): None}
    for job, ((lr, seed), ppl) in enumerate(values.items()):
        _fake_job(sweep, job, [f"optimizer.lr={lr}", f"seed={seed}"], ppl)
    # a job killed before it wrote result.json still has Hydra's record of its overrides
    (sweep / "4" / ".hydra").mkdir(parents=True)
    (sweep / "4" / ".hydra" / "overrides.yaml").write_text(
        "- model=tiny\n- optimizer.lr=1e-2\n- seed=1\n"
    )

    rows, swept = collect(sweep)
    assert swept == ["optimizer.lr", "seed"]  # model=tiny is the same everywhere
    write_summary(sweep, rows, swept)

    table = _rows(sweep / "summary.csv")
    assert [r["job"] for r in table] == ["0", "1", "2", "3", "4"]
    assert [r["status"] for r in table] == ["completed"] * 3 + ["failed", "missing"]
    assert table[0]["overrides"] == "optimizer.lr=1e-3 seed=1"
    assert table[3]["error"] == "boom" and table[3]["best_val_ppl"] == ""
    seeds = {r["overrides"]: r for r in _rows(sweep / "summary_seeds.csv")}
    assert float(seeds["optimizer.lr=1e-3"]["best_val_ppl_mean"]) == pytest.approx(105.0)
    assert float(seeds["optimizer.lr=1e-3"]["best_val_ppl_std"]) == pytest.approx(7.0710678)
    assert seeds["optimizer.lr=3e-4"]["completed"] == "1/2"
    markdown = (sweep / "summary.md").read_text()
    assert "| 3 | optimizer.lr=3e-4 seed=2 | failed |" in markdown
    assert "Across seeds" in markdown and "105.00 ± 7.07" in markdown
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_optuna_search_config_composes() -> None:
    from hydra.core.plugins import Plugins

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=ptb_optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ in Plugins.instance().class_name_to_class  # Hydra finds the plugin
    assert sweeper.direction == "minimize" and sweeper.sampler.seed == cfg.seed
    assert sweeper.storage.startswith("sqlite:///") and sweeper.storage.endswith("study.db")
    assert set(sweeper.params) == {
        "optimizer.lr",
        "model.dropout",
        "model.n_embd",
        "scheduler.warmup_steps",
    }
    assert cfg.hydra.callbacks.sweep_summary.allow_failed_jobs is True


def _grid_sweep(corpus_dir: Path, cache_dir: Path, tmp_path: Path, *options: str):
    """A 4-job sweep of which job 3 fails; the finished train.py -m process."""
    return run_entry_point(
        "train.py",
        "-m",
        *tiny_overrides(corpus_dir, cache_dir, tmp_path / "unused"),
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=5",
        # 400-token blocks: the fixture's training split has 8, too few for a batch of 16
        "data.seq_len=16,400",
        "data.batch_size=8,16",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *options,
        timeout=400,
    )


def _assert_grid_sweep_summary(sweep: Path, result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, result.stderr[-3000:]  # after all four jobs ran
    assert "error: 1 of 4 jobs failed" in result.stderr

    table = _rows(sweep / "summary.csv")
    assert [(r["data.seq_len"], r["data.batch_size"]) for r in table] == [
        ("16", "8"),
        ("16", "16"),
        ("400", "8"),
        ("400", "16"),
    ]
    assert [r["status"] for r in table] == ["completed"] * 3 + ["failed"]
    assert "too few for one batch" in table[3]["error"]
    for row in table[:3]:
        job = json.loads((sweep / row["job"] / "result.json").read_text())
        assert math.isfinite(job["best_val_ppl"]) and math.isfinite(job["test_ppl"])
        assert float(row["best_val_ppl"]) == pytest.approx(job["best_val_ppl"])
        assert int(row["steps"]) == job["steps"] > 0 and float(row["wall_time_s"]) > 0
    markdown = (sweep / "summary.md").read_text()
    assert "4 jobs: 3 completed, 1 failed" in markdown
    assert "| 3 | data.seq_len=400 data.batch_size=16 | failed |" in markdown
    assert (sweep / "summary.png").stat().st_size > 1000


@pytest.mark.slow
def test_grid_sweep_records_a_failed_job_and_summarises(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    _assert_grid_sweep_summary(tmp_path / "sweep", _grid_sweep(corpus_dir, cache_dir, tmp_path))


def _log_start(job: Path) -> float:
    """When a job's train.log got its first line (its timestamp), in seconds since the epoch."""
    stamp = (job / "train.log").read_text().split("]", 1)[0].lstrip("[")
    return time.mktime(time.strptime(stamp.split(",")[0], "%Y-%m-%d %H:%M:%S"))


@pytest.mark.slow
def test_a_parallel_sweep_runs_two_jobs_at_once_with_the_same_summary(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    options = ("hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2")
    _assert_grid_sweep_summary(sweep, _grid_sweep(corpus_dir, cache_dir, tmp_path, *options))

    jobs = [sweep / str(n) for n in range(4)]
    threads = max(len(os.sched_getaffinity(0)) // 2, 1)
    for job in jobs:  # each job took its share of the cores
        assert (
            f"2 jobs at once on {len(os.sched_getaffinity(0))} cores, {threads} threads per job"
            in (job / "train.log").read_text()
        )
    # in two worker processes (an event file's name ends with its writer's pid) ...
    pids = {p.name.rsplit(".", 2)[1] for p in sweep.glob("*/tensorboard/events.out.tfevents.*")}
    assert len(pids) == 2
    # ... side by side: some job started before another one had finished
    spans = [(_log_start(job), (job / "result.json").stat().st_mtime) for job in jobs]
    assert any(a[0] < b[1] and b[0] < a[1] for a in spans for b in spans if a is not b)


def _completed_trials(db: Path) -> int:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not (db.parent / "0" / "result.json").is_file():
        return 0  # not before the search has created the study (reading would create it too)
    try:
        study = optuna.load_study(study_name="ptb_optuna", storage=f"sqlite:///{db}")
    except Exception:  # not created yet
        return 0
    return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


@pytest.mark.slow
def test_optuna_search_resumes_after_an_interruption(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    import optuna

    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "hparams_search=ptb_optuna",
        *(  # the search picks the learning rate
            o
            for o in tiny_overrides(corpus_dir, cache_dir, tmp_path / "unused")
            if not o.startswith("optimizer.lr=")
        ),
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=5",
        "test=false",
        "hydra.sweeper.n_trials=3",
        "model.n_embd=choice(16,32)",  # narrow the search space for the tiny model
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    search = tmp_path / "logs" / "optuna" / "ptb_optuna"
    db = search / "study.db"
    # As installed (pip install -e .), without PYTHONPATH=src: Hydra does not find plugins
    # in an editable install by itself (lmlab.cli registers the search).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    # interrupted: killed as soon as the first trial is in the study
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while _completed_trials(db) < 1:
        assert first.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial completed"
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert _completed_trials(db) < 3

    # resumed: the same command finishes the study
    resumed = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = optuna.load_study(study_name="ptb_optuna", storage=f"sqlite:///{db}")
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 3
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)
    # a resumed seeded sampler does not repeat the first trials' values
    assert len({t.params["optimizer.lr"] for t in study.trials}) == len(study.trials)
    for trial in complete:  # job folder N holds trial N
        job = json.loads((search / str(trial.number) / "result.json").read_text())
        assert job["best_val_ppl"] == pytest.approx(trial.value)
    table = _rows(search / "summary.csv")
    assert sum(r["status"] == "completed" for r in table) == 3
    assert (search / "optimization_results.yaml").is_file()
