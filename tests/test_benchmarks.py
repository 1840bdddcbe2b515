"""The benchmarks the README quotes still run and print every row (timings are not checked)."""

import importlib.util
import re
import sys

import pytest

from conftest import ROOT, run_entry_point

pytestmark = pytest.mark.slow


def test_generate_speed_prints_every_method_and_batch():
    result = run_entry_point("benchmarks/generate_speed.py", "--quick", "--no-hf", "--layouts")
    assert result.returncode == 0, result.stderr[-2000:]
    main, layout_table = result.stdout.split("\n32 prompts")  # --layouts prints its table last
    lines = [line.split() for line in main.splitlines()]
    rows = {(w[0], w[1]): w[2:] for w in lines if w and w[0] in ("greedy", "sample", "beam4")}
    layout_lines = [line.split() for line in layout_table.splitlines()]
    layout_rows = [w for w in layout_lines if w and w[0] in ("greedy", "beam4")]
    assert [(w[0], w[1]) for w in layout_rows] == [
        (m, b) for m in ("greedy", "beam4") for b in "18"
    ]
    for copies, layout, ratio in (map(float, w[2:]) for w in layout_rows):
        assert copies > 0 and layout > 0
        assert ratio == pytest.approx(
            copies / layout, abs=copies / layout * (0.5 / copies + 0.5 / layout) + 0.005
        )
    assert set(rows) == {(m, b) for m in ("greedy", "sample", "beam4") for b in ("1", "8")}
    for cached, uncached, ratio in rows.values():  # tokens/s with and without the cache
        cached, uncached = float(cached), float(uncached)  # printed as whole numbers
        assert cached > 0 and uncached > 0
        # the ratio is of the unrounded speeds: allow for rounding both, and it to 0.1
        rounding = cached / uncached * (0.5 / cached + 0.5 / uncached) + 0.05
        assert float(ratio) == pytest.approx(cached / uncached, abs=rounding)
    grouped, padded = (
        line.split() for line in result.stdout.splitlines() if line.startswith("one ")
    )
    slow, fast = float(grouped[-1]), float(padded[-2])  # tokens/s, printed as whole numbers
    assert slow > 0 and fast > 0
    # the ratio is of the unrounded speeds: allow for rounding both to integers, and it to 0.01
    rounding = fast / slow * (0.5 / slow + 0.5 / fast) + 0.005
    assert float(padded[-1].rstrip("x")) == pytest.approx(fast / slow, abs=rounding)


def test_generate_speed_times_llama_against_hugging_faces_llama():
    result = run_entry_point(
        "benchmarks/generate_speed.py", "--quick", "--cache-only", "--family", "llama", "--kernels"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    main, kernel_table = result.stdout.split("the step's products through oneDNN against")
    kernel_rows = [
        w for w in map(str.split, kernel_table.splitlines()) if w[:1] in (["greedy"], ["beam4"])
    ]
    assert [(w[0], w[1]) for w in kernel_rows] == [
        (m, b) for m in ("greedy", "beam4") for b in "18"
    ]
    for onednn, through_mm, ratio in (map(float, w[2:]) for w in kernel_rows):
        assert onednn > 0 and through_mm > 0
        rounding = onednn / through_mm * (0.5 / onednn + 0.5 / through_mm) + 0.005
        assert ratio == pytest.approx(onednn / through_mm, abs=rounding)
    assert "model llama_small (llama): 2 layers" in main
    assert "LlamaForCausalLM.generate" in main
    rows = [line.split() for line in main.splitlines()]
    rows = {(w[0], w[1]): w[2:] for w in rows if w and w[0] in ("greedy", "sample", "beam4")}
    assert set(rows) == {(m, b) for m in ("greedy", "sample", "beam4") for b in ("1", "8")}
    for cached, _, _, hf, ratio in rows.values():
        cached, hf = float(cached), float(hf)
        assert cached > 0 and hf > 0
        assert float(ratio) == pytest.approx(
            cached / hf, abs=cached / hf * (0.5 / cached + 0.5 / hf) + 0.005
        )


def test_train_speed_prints_every_variant(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run as a script
    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "benchmarks/train_speed.py")
    train_speed = importlib.util.module_from_spec(spec)
    sys.modules["train_speed"] = train_speed  # its dataclasses look their module up there
    spec.loader.exec_module(train_speed)
    VARIANTS = train_speed.VARIANTS

    # fp32 rows only: where the CPU has no bf16 (AVX2), a bf16 matmul runs at 1% of fp32's rate
    result = run_entry_point("benchmarks/train_speed.py", "--quick", "--no-compile", "--no-bf16")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {}
    expected = {v.name for v in VARIANTS if not v.compile and v.matmul_dtype == "fp32"}
    for line in result.stdout.splitlines():
        # the longest name the line starts with: "lightning fp32" is also the start of
        # "lightning fp32 foreach AdamW"
        names = [name for name in expected if line.startswith(name + " ")]
        if names:
            name = max(names, key=len)
            rows[name] = line[len(name) :].replace("(default)", "").split()
    assert set(rows) == expected
    assert "default: trainer.precision=auto chose " in result.stdout
    # MFU is tokens/s x FLOPs per token over the printed peak. Not bounded by 100% here: the
    # peak and the steps are sampled at different moments of a machine other tests share.
    peak = float(re.search(r"fp32 matmul peak \(1024\^3\): (\d+) GFLOP/s", result.stdout)[1])
    flops = float(re.search(r"model FLOPs per token ([\d.]+) M", result.stdout)[1])
    for tokens_per_s, mfu, ratio, _ in rows.values():
        tokens_per_s, mfu = float(tokens_per_s), float(mfu.rstrip("%")) / 100
        assert tokens_per_s > 0 and float(ratio) > 0
        expected_mfu = tokens_per_s * flops * 1e6 / (peak * 1e9)
        rounding = expected_mfu * (0.5 / tokens_per_s + 0.05 / flops + 0.5 / peak) + 0.0005
        assert mfu == pytest.approx(expected_mfu, abs=rounding)


def test_loss_speed_prints_every_variant():
    result = run_entry_point(
        "benchmarks/loss_speed.py", "--quick", "--tokens", "256", "--width", "32", "--bias"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("machine: ")
    names = [
        "plain: logits, then F.cross_entropy (reference)",
        "torch F.linear_cross_entropy, reference path",
        "torch F.linear_cross_entropy, chunked",
        "lmlab.loss.linear_cross_entropy",
        "lmlab.loss, fp32 matmuls by torch.mm",
        "lmlab.loss, fp32 matmuls by oneDNN",
    ]
    rows = {
        name: line[len(name) :].split()
        for line in result.stdout.splitlines()
        for name in names
        if line.startswith(name)
    }
    assert set(rows) == set(names)
    reference_ms = float(rows[names[0]][0])
    for ms, ratio in rows.values():
        ms = float(ms)
        assert ms > 0
        # the ratio is of unrounded times: allow for rounding both to 0.1 ms, and it to 0.001
        rounding = reference_ms / ms * (0.05 / reference_ms + 0.05 / ms) + 0.0005
        assert float(ratio) == pytest.approx(reference_ms / ms, abs=rounding)


def test_lstm_speed_prints_the_plain_loop_and_lmlab_and_marks_the_default():
    result = run_entry_point("benchmarks/lstm_speed.py", "--quick")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("machine: ")
    rows = [line for line in lines if line.startswith(("plain nn.LSTM", "lmlab lstm"))]
    assert rows[0].startswith("plain nn.LSTM loop (reference)") and rows[0].split()[-1] == "1.000"
    assert rows[1].startswith("lmlab lstm, Lightning ")
    assert sum("(default)" in row for row in rows) == 1  # fp32's row, or auto's other choice
    for row in rows:
        assert float(row.split()[-2]) > 0 and float(row.split()[-1]) > 0
    assert any(line.startswith("default: trainer.precision=auto chose ") for line in lines)


def test_attention_speed_prints_every_variant_in_both_dtypes():
    result = run_entry_point("benchmarks/attention_speed.py", "--quick")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("machine: ")
    assert [line.split(" (")[0] for line in lines if "(training uses: " in line] == [
        "float32",
        "bfloat16",
    ]
    for name in ("SDPA, its own kernel choice", "SDPA, math backend", "lmlab causal_attention"):
        rows = [line for line in lines if line.startswith(name)]
        assert len(rows) == 2 and all(float(row.split()[-2]) > 0 for row in rows)


def test_train_speed_marks_the_row_compile_auto_would_run(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "benchmarks/train_speed.py")
    train_speed = importlib.util.module_from_spec(spec)
    sys.modules["train_speed"] = train_speed
    spec.loader.exec_module(train_speed)
    variants = train_speed.VARIANTS
    eager, compiled = "lightning bf16-mixed", "lightning bf16-mixed compile"
    speeds = {v.name: [1000.0] for v in variants}
    warmups = {v.name: [1.0] for v in variants}
    speeds[compiled], warmups[compiled] = [2000.0], [11.0]  # 2x the steps, 10 s to compile
    name, reason = train_speed.default_variant(variants, "bf16-mixed", speeds, warmups)
    assert name == compiled and "2.00x eager" in reason and "compile 0:00:10" in reason
    # Three rounds: only the first compiles cold, the later ones reuse its cache.
    speeds = {v.name: [1000.0] * 3 for v in variants}
    warmups = {v.name: [1.0] * 3 for v in variants}
    speeds[compiled], warmups[compiled] = [2000.0] * 3, [11.0, 1.5, 1.5]
    name, reason = train_speed.default_variant(variants, "bf16-mixed", speeds, warmups)
    assert name == compiled and "compile 0:00:10" in reason
    warmups[compiled] = [1000.0, 1.5, 1.5]  # a compile longer than the 300 s run
    name, reason = train_speed.default_variant(variants, "bf16-mixed", speeds, warmups)
    assert name == eager and "would not gain" in reason
    fp32_only = [v for v in variants if not v.compile]
    assert train_speed.default_variant(fp32_only, "32-true", speeds, warmups)[0] == "lightning fp32"


@pytest.mark.slow  # two compiles of the small model, each in its own process: about 20 s
def test_compile_memory_prints_each_variant_against_the_whole_model_compile():
    result = run_entry_point("benchmarks/compile_memory.py", "--quick", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("machine: ")
    rows = {line[:26].strip(): line[26:].split() for line in lines[4:]}
    assert list(rows) == ["eager", "per block (lmlab)", "whole model (reference)"]
    assert rows["whole model (reference)"][-1] == "1.000"
    for first, step, peak, ratio in rows.values():
        assert float(first) >= 0 and float(step) > 0 and float(peak) > 0
        assert float(ratio) == pytest.approx(
            float(peak) / float(rows["whole model (reference)"][2]), abs=2e-3
        )
