"""`trainer.precision=auto` takes bf16-mixed only where this machine's bf16 matmuls are faster."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from lmlab import precision as chooser
from lmlab.errors import UserError
from lmlab.precision import BF16_MIN_SPEEDUP, CACHE_FILE, choose_precision


@pytest.fixture
def speedup(monkeypatch):
    """Stand in for the measurement: set `.value`, count `.calls`."""

    class Measured:
        value = 1.0
        calls = 0

        def __call__(self, m: int, k: int, n: int) -> float:
            self.calls += 1
            return self.value

    measured = Measured()
    monkeypatch.setattr(chooser, "bf16_speedup", measured)
    monkeypatch.setattr(chooser, "cpu_flags", lambda: ["avx512f", "avx512_bf16"])
    return measured


@pytest.mark.parametrize(
    "ratio, expected",
    [
        (0.01, "32-true"),  # an AVX2 CPU: bf16 emulated
        (0.5, "32-true"),  # AVX-512 without BF16
        (BF16_MIN_SPEEDUP - 1e-9, "32-true"),
        (BF16_MIN_SPEEDUP, "bf16-mixed"),
        (4.3, "bf16-mixed"),  # AVX-512 BF16
    ],
)
def test_auto_picks_bf16_only_when_it_is_faster(tmp_path, speedup, ratio, expected):
    speedup.value = ratio
    choice = choose_precision("auto", "cpu", 256, tmp_path)
    assert choice.precision == expected
    assert f"{ratio:.2f}x the fp32 rate" in choice.reason
    assert "measured" in choice.reason


def test_the_measurement_is_cached_per_machine_and_shape(tmp_path, speedup):
    speedup.value = 4.0
    first = choose_precision("auto", "cpu", 256, tmp_path)
    again = choose_precision("auto", "cpu", 256, tmp_path)
    assert speedup.calls == 1
    assert first.precision == again.precision == "bf16-mixed"
    assert "cached" in again.reason
    choose_precision("auto", "cpu", 512, tmp_path)  # another width is another shape
    assert speedup.calls == 2
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())) == 2


def test_a_corrupt_cache_is_measured_again(tmp_path, speedup):
    (tmp_path / CACHE_FILE).write_text("{not json")
    speedup.value = 0.5
    assert choose_precision("auto", "cpu", 256, tmp_path).precision == "32-true"
    assert speedup.calls == 1
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())) == 1


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed", "64-true"])
def test_an_explicit_precision_always_wins(tmp_path, speedup, explicit):
    speedup.value = 100.0 if explicit == "32-true" else 0.01
    choice = choose_precision(explicit, "cpu", 256, tmp_path)
    assert choice.precision == explicit
    assert choice.reason == "set by trainer.precision"
    assert speedup.calls == 0


@pytest.mark.parametrize("flags", [["avx2", "fma"], ["avx512f", "avx512bw"]])
def test_x86_without_bf16_instructions_is_fp32_without_measuring(
    tmp_path, speedup, monkeypatch, flags
):
    monkeypatch.setattr(chooser, "cpu_flags", lambda: flags)
    speedup.value = 100.0  # a measurement, were one taken, would say bf16
    choice = choose_precision("auto", "cpu", 256, tmp_path)
    assert choice.precision == "32-true"
    assert choice.reason.endswith("has no bf16 matmul instructions")
    assert speedup.calls == 0


def test_without_flags_to_read_it_measures(tmp_path, speedup, monkeypatch):
    monkeypatch.setattr(chooser, "cpu_flags", lambda: None)  # e.g. an ARM CPU
    speedup.value = 2.0
    assert choose_precision("auto", "cpu", 256, tmp_path).precision == "bf16-mixed"
    assert speedup.calls == 1


def test_the_measured_matmul_is_big_enough_to_time_and_small_enough_to_be_quick():
    for width in (16, 256, 1024):
        m, k, n = chooser.matmul_shape(width)
        assert 512 <= m <= 8192 and (k, n) == (width, 4 * width)
    m, k, n = chooser.matmul_shape(64)
    assert chooser.bf16_speedup(m, k, n) > 0


def test_a_run_with_auto_says_what_it_chose_and_why(one_validation_run, cache_dir):
    run = one_validation_run
    log = (run / "train.log").read_text()
    summary = json.loads((run / "summary.json").read_text())
    flags = chooser.cpu_flags()
    if flags is not None and not chooser.native_bf16(flags):  # x86 without BF16: no measuring
        reason = f"{chooser.cpu_model()} has no bf16 matmul instructions"
        assert f"precision 32-true: {reason}" in log
        assert summary["precision"] == f"32-true ({reason})"
        return
    width = OmegaConf.load(run / ".hydra" / "config.yaml").model.n_embd
    cached = json.loads((cache_dir / CACHE_FILE).read_text())
    shape = str(chooser.matmul_shape(width))
    (ratio,) = [v for k, v in cached.items() if shape in k.split(" | ")]
    expected = "bf16-mixed" if ratio >= BF16_MIN_SPEEDUP else "32-true"
    assert f"precision {expected}: bf16 matmuls run at {ratio:.2f}x the fp32 rate" in log
    assert summary["precision"].startswith(f"{expected} (bf16 matmuls run at")


@pytest.mark.parametrize("explicit", ["bf16-mixed", "bf16-true"])
def test_an_explicit_bf16_lstm_on_a_cpu_without_bf16_is_one_line(tmp_path, monkeypatch, explicit):
    monkeypatch.setattr(chooser, "cpu_flags", lambda: ["avx2", "fma"])
    with pytest.raises(
        UserError,
        match=rf"^trainer.precision={explicit}: the LSTM has no bf16 "
        r"kernel on .* \(no AVX-512 BF16 or AMX\); use trainer.precision=32-true",
    ):
        choose_precision(explicit, "cpu", 200, tmp_path, needs_native_bf16=True)
    # a Transformer runs (slowly) in emulated bf16, and a bf16 CPU runs the LSTM
    assert choose_precision(explicit, "cpu", 200, tmp_path).precision == explicit
    monkeypatch.setattr(chooser, "cpu_flags", lambda: ["avx512f", "amx_bf16"])
    choice = choose_precision(explicit, "cpu", 200, tmp_path, needs_native_bf16=True)
    assert choice.precision == explicit


def test_the_lstm_is_the_family_that_needs_native_bf16():
    # train.py passes the model's own attribute: no family names outside the models
    from lmlab.models import build_model
    from lmlab.models.gpt import GPTConfig
    from lmlab.models.llama import LlamaConfig
    from lmlab.models.lstm import LSTMConfig

    configs = {
        "gpt": GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8),
        "llama": LlamaConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8),
        "lstm": LSTMConfig(vocab_size=20, block_size=8, n_layer=1, n_embd=8, n_hidden=8),
    }
    needs = {family: build_model(config).needs_native_bf16 for family, config in configs.items()}
    assert needs == {"gpt": False, "llama": False, "lstm": True}
