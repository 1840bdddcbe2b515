"""A run folder holds exactly one run: claimed atomically, locked, never shared or overwritten."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.errors import UserError
from lmlab.run_folder import LOCK_FILE, RunLock, claim_new_folder, further_rank_argv

from conftest import ROOT, python_path, run_entry_point, tiny_overrides


def _lock_of(pid: int) -> str:
    return json.dumps({"pid": pid, "host": os.uname().nodename, "started": "then"})


def test_claiming_a_taken_name_gives_the_next_free_one(tmp_path: Path) -> None:
    first = claim_new_folder(tmp_path / "runs" / "2026-12-02_10-00-00")
    second = claim_new_folder(tmp_path / "runs" / "2026-12-02_10-00-00")
    third = claim_new_folder(tmp_path / "runs" / "2026-12-02_10-00-00")
    assert [p.name for p in (first, second, third)] == [
        "2026-12-02_10-00-00",
        "2026-12-02_10-00-00_2",
        "2026-12-02_10-00-00_3",
    ]
    assert all(p.is_dir() for p in (first, second, third))


@pytest.mark.parametrize("variable", ["RANK", "SLURM_PROCID"])
def test_further_ranks_of_torchrun_or_srun_write_no_hydra_folder_or_log(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["train.py", "trainer=ddp", "hydra/job_logging=default", "hydra.output_subdir=.h"]
    monkeypatch.setenv(variable, "0")
    assert further_rank_argv(argv) == argv  # rank 0 writes the folder
    monkeypatch.setenv(variable, "1")
    assert further_rank_argv(argv) == [
        "train.py",
        "trainer=ddp",
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
    ]


def test_a_live_owner_keeps_the_folder(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(_lock_of(sleeper.pid))
        with pytest.raises(UserError, match=f"in use by process {sleeper.pid} on "):
            RunLock.acquire(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_is_released_and_can_be_taken_again(tmp_path: Path) -> None:
    lock = RunLock.acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
        RunLock.acquire(tmp_path)
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock.acquire(tmp_path).release()


def _take(folder: str, results: multiprocessing.Queue) -> None:
    try:
        RunLock.acquire(Path(folder))
        results.put("took it")
        time.sleep(2)  # hold it while the others try
    except UserError as error:
        results.put(str(error))


def test_a_stale_lock_is_reported_and_taken_over_by_exactly_one_process(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(_lock_of(dead.pid))
    results: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()
    racers = [
        multiprocessing.get_context("fork").Process(target=_take, args=(str(tmp_path), results))
        for _ in range(4)
    ]
    for racer in racers:
        racer.start()
    outcomes = sorted(results.get(timeout=30) for _ in racers)
    for racer in racers:
        racer.join(timeout=30)
    assert outcomes.count("took it") == 1, outcomes
    assert all("in use by process" in o for o in outcomes if o != "took it"), outcomes
    assert f"was locked by process {dead.pid}" in capfd.readouterr().err
    assert not list(tmp_path.glob(f"{LOCK_FILE}.stale-*"))


# -- end to end ---------------------------------------------------------------


@pytest.mark.slow
def test_a_new_run_into_a_used_folder_is_refused_and_touches_nothing(
    trained_run: Path, corpus_dir: Path, cache_dir: Path
) -> None:
    before = {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()}
    result = run_entry_point("train.py", *tiny_overrides(corpus_dir, cache_dir, trained_run))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: run folder {trained_run} already holds a run (.hydra, checkpoints, "
        f"metrics.jsonl, result.json, summary.json); continue it with resume={trained_run}, "
        "or give the new run another hydra.run.dir"
    ]
    after = {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()}
    assert after == before  # best.ckpt, last.ckpt and every record byte for byte


def test_a_folder_left_by_a_run_refused_for_bad_input_takes_the_next_run(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"  # a fixed folder, as under SLURM
    refused = run_entry_point(
        "train.py", *tiny_overrides(corpus_dir, cache_dir, run), "data.batch_size=-1"
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: data.batch_size must be a positive integer, got -1"
    )
    assert (run / ".hydra").is_dir() and (run / "result.json").is_file()
    fixed = run_entry_point(
        "train.py", *tiny_overrides(corpus_dir, cache_dir, run), "trainer.max_steps=2"
    )
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "holds only a run refused before training" in fixed.stderr
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_a_run_folder_that_cannot_be_created_gives_one_line(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_entry_point("train.py", *tiny_overrides(corpus_dir, cache_dir, blocker / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: run folder {blocker}/run cannot be created: Not a directory; choose another "
        "place with hydra.run.dir=... (or hydra.sweep.dir=... for -m)"
    ]


def test_a_read_only_place_gives_one_line(corpus_dir: Path, cache_dir: Path) -> None:
    place = Path("/proc/lmlab-run")  # read-only for every user, root included
    result = run_entry_point("train.py", *tiny_overrides(corpus_dir, cache_dir, place))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: run folder {place} cannot be created: ")


@pytest.mark.slow
def test_two_runs_started_together_with_a_clock_named_folder_get_two_folders(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # The folder is named by the clock, as the default is, but by the year: the two
    # runs surely ask for the same name, as two runs started in one second do.
    overrides = [
        *(o for o in tiny_overrides(corpus_dir, cache_dir, tmp_path) if "hydra.run.dir" not in o),
        "trainer.max_epochs=1",
        "test=false",
        "hydra.run.dir=" + str(tmp_path / "runs") + "/run-${now:%Y}",
    ]
    env = {**os.environ, "PYTHONPATH": python_path(os.environ)}
    runs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *overrides],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=240) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-2000:]
    year = time.strftime("%Y")
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == [f"run-{year}", f"run-{year}_2"]
    for name in folders:
        folder = tmp_path / "runs" / name
        result = json.loads((folder / "result.json").read_text())
        assert result["status"] == "completed" and Path(result["output_dir"]) == folder
        assert (folder / "checkpoints" / "best.ckpt").is_file()
        assert not (folder / LOCK_FILE).exists()  # released at the end
        hydra = (folder / ".hydra" / "hydra.yaml").read_text()
        assert f"output_dir: {folder}" in hydra


def test_a_grid_sweep_into_an_earlier_sweeps_folder_is_refused(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / "result.json").write_text("{}")
    overrides = [o for o in tiny_overrides(corpus_dir, cache_dir, tmp_path) if "hydra." not in o]
    result = run_entry_point("train.py", "-m", *overrides, f"hydra.sweep.dir={sweep}", "seed=1,2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: sweep folder {sweep} already holds jobs of an earlier sweep (0); give this "
        "sweep another hydra.sweep.dir"
    ]
    assert sorted(p.name for p in sweep.iterdir()) == ["0"]
