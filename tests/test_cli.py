"""The console scripts: each is the same Hydra app as its root script, and a plain install works."""

import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, RUN_FOLDER, console_scripts, run_console_script, run_entry_point


def test_each_console_script_names_a_function_of_the_package():
    scripts = console_scripts()
    assert {"lmlab-train", "lmlab-generate", "lmlab-eval", "lmlab-plot"} <= set(scripts)
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function))


@pytest.mark.parametrize(
    "script, root, expected",
    [
        ("lmlab-train", "train.py", "_target_: lmlab.samples.SampleText"),
        ("lmlab-generate", "generate.py", "strategy: sample"),
        ("lmlab-eval", "eval.py", "split: test"),
    ],
)
def test_help_is_the_same_from_the_console_script_and_the_root_script(script, root, expected):
    from_script = run_console_script(script, "--help")
    from_root = run_entry_point(root, "--help")
    assert from_script.returncode == from_root.returncode == 0, (
        from_script.stderr + from_root.stderr
    )
    assert from_script.stdout == from_root.stdout
    assert expected in from_script.stdout


def test_plot_help():
    result = run_console_script("lmlab-plot", "--help")
    assert result.returncode == 0 and "usage: lmlab-plot" in result.stdout


@pytest.mark.slow
def test_console_script_trains_from_any_folder(console_run):
    run_dir, result = console_run
    # named after the job as train.py names it, everything inside the run folder
    assert sorted(p.name for p in run_dir.iterdir()) == RUN_FOLDER
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["run"]
    assert "Run summary" in result.stdout
    # Lightning's lines print once, through Hydra's logging (and into train.log), not twice
    console = result.stdout + result.stderr
    assert console.count("Seed set to 1234") == 1
    assert console.count("GPU available:") == 1
    assert "Seed set to 1234" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_built_package_carries_the_configs_and_scripts(tmp_path):
    source = tmp_path / "source"
    for folder in ("src", "conf"):
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "wheel"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("lmlab-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
        archive.extractall(tmp_path / "site")
    expected = {
        f"lmlab/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")
    }
    missing = sorted(expected - names)
    assert not missing, (
        f"not in the wheel: {missing}; list each config group in pyproject's packages"
    )
    for name, target in console_scripts().items():
        assert f"{name} = {target}" in scripts
    # installed without the checkout, lmlab reads the configs it carries
    found = subprocess.run(
        [sys.executable, "-c", "from lmlab.cli import config_dir; print(config_dir())"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""},
        timeout=60,
    )
    assert found.stdout.strip() == str((tmp_path / "site" / "lmlab" / "conf").resolve())
