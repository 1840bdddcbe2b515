"""`trainer.precision=auto`: fp32 or bf16-mixed, whichever this machine runs faster.

Whether bf16 pays on a CPU depends on the CPU, not on the code: its matmuls run
at 4x the fp32 rate on an AVX-512 BF16 EPYC, at half of it on an AVX-512 Xeon
without BF16, and at a hundredth of it on an AVX2 EPYC. So `auto` measures: one
matmul of the model's own width in fp32 and in bf16 (a fixed amount of work,
well under a second even where bf16 is slow), and takes bf16-mixed when its
matmul is at least `BF16_MIN_SPEEDUP` times faster (bf16-mixed also pays for
casts and keeps fp32 weights, so a small win in the matmul is none in a step).
On an x86 CPU whose flags show no bf16 matmul instructions (AVX-512 BF16 or
AMX) there is nothing to measure: bf16 is emulated there, and oneDNN's LSTM
has no bf16 kernel for it at all, so `auto` is fp32.
The ratio is cached per CPU model, torch version, thread count and shape in
`precision.json` in the cache folder, so later runs decide at once and all
processes of one machine read the same answer. A precision given explicitly
is always used as given.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.errors import UserError
from lmlab.machine import cpu_flags, cpu_model, native_bf16
from lmlab.machine_cache import MachineCache, machine_key
from lmlab.onednn import mm, uses_onednn

log = logging.getLogger(__name__)

AUTO = "auto"
CACHE_FILE = "precision.json"
BF16_MIN_SPEEDUP = 1.5
MATMUL_FLOPS = 50e6  # the work of one timed matmul (at least 512 tokens of it)
REPEATS = 5


@dataclass(frozen=True)
class Choice:
    """The precision Lightning gets, and why, for train.log and the run summary."""

    precision: str
    reason: str


def choose_precision(
    requested: str | int,
    accelerator: str,
    width: int,
    cache_dir: str | Path,
    needs_native_bf16: bool = False,
) -> Choice:
    """The Lightning precision for `requested` (`auto` or an explicit value) on this machine.

    `width` is the model's hidden size: the matmul timed is tokens x width x 4*width,
    the shape of its MLP. `needs_native_bf16`: the model's own attribute of that name
    (the LSTM: oneDNN's kernel has no bf16 path on a CPU without bf16 instructions).
    """
    if requested != AUTO:
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
        flags = cpu_flags() if on_cpu else None
        bf16 = str(requested).startswith("bf16")
        if needs_native_bf16 and bf16 and flags and not native_bf16(flags):
            raise UserError(
                f"trainer.precision={requested}: the LSTM has no bf16 kernel on {cpu_model()} "
                "(no AVX-512 BF16 or AMX); use trainer.precision=32-true or auto"
            )
        return Choice(str(requested), "set by trainer.precision")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return Choice("bf16-mixed", "the GPU supports bf16")
        return Choice("32-true", "no GPU with bf16 found")
    if accelerator != "cpu" and accelerator != "auto":
        return Choice("32-true", f"accelerator {accelerator}: auto chooses only on CPU and GPU")
    flags = cpu_flags()
    if flags is not None and not native_bf16(flags):
        # x86 without AVX-512 BF16 or AMX emulates bf16 (never faster), and some of its
        # kernels (oneDNN's LSTM) have no bf16 path at all: no need to measure
        return Choice("32-true", f"{cpu_model()} has no bf16 matmul instructions")
    shape = matmul_shape(width)
    # fp32 matmuls as the model runs them: through oneDNN where lmlab.onednn takes it (a
    # measurement cached from torch.mm's fp32 rate there would misjudge it)
    key = machine_key(str(shape), *(["fp32 through oneDNN"] if uses_onednn() else []))
    cache = MachineCache(cache_dir, CACHE_FILE)
    speedup, how = cache.read().get(key), "cached"
    if not isinstance(speedup, (int, float)):  # none yet, or not a number: measure
        speedup, how = bf16_speedup(*shape), "measured"
        cache.store(key, speedup)
    precision = "bf16-mixed" if speedup >= BF16_MIN_SPEEDUP else "32-true"
    reason = (
        f"bf16 matmuls run at {speedup:.2f}x the fp32 rate here ({how}: "
        f"{shape[0]}x{shape[1]}x{shape[2]} on {cpu_model()}, {torch.get_num_threads()} threads; "
        f"bf16-mixed needs {BF16_MIN_SPEEDUP}x)"
    )
    return Choice(precision, reason)


def matmul_shape(width: int) -> tuple[int, int, int]:
    """(tokens, width, 4 * width), with as many tokens as `MATMUL_FLOPS` of work allows.

    Never fewer than 512 tokens: a matmul of a few microseconds measures thread wake-ups
    (on a busy machine, fp32's two threads waited on a busy core and read 26x slower
    than bf16), not the arithmetic.
    """
    tokens = int(MATMUL_FLOPS / (2 * width * 4 * width))
    return (min(8192, max(512, tokens)), width, 4 * width)


def bf16_speedup(m: int, k: int, n: int) -> float:
    """fp32 time over bf16 time of an m x k by k x n matmul, best of `REPEATS` each."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator)
    b = torch.randn(k, n, generator=generator)
    fp32 = _best_time(a, b)
    bf16 = _best_time(a.bfloat16(), b.bfloat16(), give_up_after=10 * fp32)
    return fp32 / bf16


def _best_time(a: torch.Tensor, b: torch.Tensor, give_up_after: float = math.inf) -> float:
    """Best of REPEATS of `a @ b` as a model's layer computes it (`lmlab.onednn.mm`)."""
    mm(a, b)  # warm-up: first-call set-up is no part of the rate
    best = math.inf
    for _ in range(REPEATS):
        start = time.perf_counter()
        mm(a, b)
        best = min(best, time.perf_counter() - start)
        if best > give_up_after:  # slow beyond doubt: more samples would only cost time
            break
    return best
