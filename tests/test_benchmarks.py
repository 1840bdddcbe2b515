"""The benchmark scripts the README quotes still run and print every row (timings are not checked)."""

import pytest

from conftest import run_entry_point

pytestmark = pytest.mark.slow


def table_rows(stdout: str, names: list[str]) -> dict[str, list[str]]:
    """Rows of train_speed's table by variant name (the first 34 characters of a line)."""
    rows = {}
    for line in stdout.splitlines():
        if line[:34].strip() in names:
            rows[line[:34].strip()] = line[34:].split()
    return rows


def test_generate_speed_prints_every_method_and_batch():
    result = run_entry_point("benchmarks/generate_speed.py", "--quick", "--no-hf")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split() for line in result.stdout.splitlines()]
    rows = {(w[0], w[1]): w[2:] for w in lines if w and w[0] in ("greedy", "sample", "beam4")}
    assert set(rows) == {(m, b) for m in ("greedy", "sample", "beam4") for b in ("1", "8")}
    for cached, uncached, ratio in rows.values():  # tokens/s with and without the cache
        assert float(cached) > 0 and float(uncached) > 0
        assert float(ratio) == pytest.approx(float(cached) / float(uncached), abs=0.1)


def test_train_speed_prints_every_variant_against_the_reference():
    result = run_entry_point("benchmarks/train_speed.py", "--quick", "--no-compile")
    assert result.returncode == 0, result.stderr[-2000:]
    names = ["plain fp32 (reference)", "plain fp32 fused loss", "lightning fp32 fused AdamW"]
    names += ["lightning fp32", "plain bf16-mixed", "lightning bf16-mixed"]
    rows = table_rows(result.stdout, names)
    assert set(rows) == set(names)
    tokens_per_s, mfu, vs_reference, _ = rows["plain fp32 (reference)"]
    assert float(tokens_per_s) > 0 and mfu.endswith("%") and float(vs_reference) == 1.0
    for _, _, vs_reference, vs_same_setup in rows.values():
        assert float(vs_reference) > 0 and float(vs_same_setup) > 0
