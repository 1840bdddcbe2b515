"""generate_speed.py, which the README quotes, still runs and prints every row (timings are not
checked). train_speed.py is left out: its quick mode builds six Trainers, 25 s of the suite."""

import pytest

from conftest import run_entry_point

pytestmark = pytest.mark.slow


def test_generate_speed_prints_every_method_and_batch():
    result = run_entry_point("benchmarks/generate_speed.py", "--quick", "--no-hf")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split() for line in result.stdout.splitlines()]
    rows = {(w[0], w[1]): w[2:] for w in lines if w and w[0] in ("greedy", "sample", "beam4")}
    assert set(rows) == {(m, b) for m in ("greedy", "sample", "beam4") for b in ("1", "8")}
    for cached, uncached, ratio in rows.values():  # tokens/s with and without the cache
        assert float(cached) > 0 and float(uncached) > 0
        assert float(ratio) == pytest.approx(float(cached) / float(uncached), abs=0.1)
