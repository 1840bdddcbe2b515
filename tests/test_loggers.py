"""Loggers: the resolved config for every logger, W&B offline without a key, no secret on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmlab.loggers import REDACTED, WandbLogger, log_config, wandb_api_key_available

from conftest import run_entry_point, tiny_overrides

SENTINEL = "sentinel-xyz-0123456789abcdef0123456789abcdef"


@pytest.fixture
def no_wandb_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no ~/.netrc from `wandb login`
    return home


class Recorder:
    def __init__(self) -> None:
        self.params: dict = {}

    def log_hyperparams(self, params: dict) -> None:
        self.params = params


def test_log_config_gives_resolved_values_and_redacts_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MY_SERVICE_TOKEN", SENTINEL)
    cfg = OmegaConf.create(
        {"optimizer": {"lr": 1e-3}, "width": 32, "model": {"n_embd": "${width}"}, "url": SENTINEL}
    )
    recorder = Recorder()
    log_config([recorder], cfg)
    assert recorder.params["model"]["n_embd"] == 32  # resolved
    assert recorder.params["url"] == REDACTED


def test_api_key_sources(no_wandb_credentials: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not wandb_api_key_available()
    netrc = no_wandb_credentials / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {SENTINEL}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_api_key_available()
    monkeypatch.delenv("NETRC")
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    assert wandb_api_key_available()


def test_wandb_without_a_key_logs_offline_with_one_notice(
    no_wandb_credentials: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = WandbLogger(save_dir=str(tmp_path / "run"), project="lmlab")  # starts no run
    assert logger._wandb_init["mode"] == "offline"
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "no API key" in notice[0] and "wandb sync" in notice[0]


@pytest.mark.slow
def test_wandb_offline_sweep_one_run_per_job_and_no_secret_on_disk(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    sweep = tmp_path / "sweep"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": SENTINEL,
        "HOME": str(home),
    }
    result = run_entry_point(
        "train.py",
        "-m",
        *tiny_overrides(corpus_dir, cache_dir, tmp_path / "unused"),
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=5",
        "logger=[tensorboard,wandb]",
        "optimizer.lr=1e-3,3e-3",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.sweep.dir={sweep}",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("W&B: WANDB_MODE=offline; logging offline") == 2  # one per job
    assert "wandb:" not in result.stdout + result.stderr  # W&B's own lines stay quiet

    run_ids = set()
    for job in ("0", "1"):
        runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs  # each job its own W&B run, in its own folder
        run_ids.add(runs[0].name.rsplit("-", 1)[1])
        records = next(runs[0].glob("run-*.wandb")).read_bytes()
        assert b"checkpoint/best" in records and b"best.ckpt" in records
        assert b"n_embd" in records and b"val/ppl" in records  # resolved config and metrics
        assert list((sweep / job / "tensorboard").glob("events.out.tfevents.*"))
    assert len(run_ids) == 2

    secret = SENTINEL.encode()
    files = [p for p in sweep.rglob("*") if p.is_file()]
    assert len(files) > 20
    leaks = [str(p) for p in files if secret in p.read_bytes()]
    assert not leaks, leaks
