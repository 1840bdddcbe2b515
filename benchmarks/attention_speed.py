"""Causal attention, forward and backward: SDPA's CPU kernels against lmlab's written-out one.

    python benchmarks/attention_speed.py            # the `small` model's shapes, fp32 and bf16
    python benchmarks/attention_speed.py --quick    # a smoke run

`lmlab.models.attention.prefers_written_out` sends CPU training in bf16 (and any
attention with dropout) to the written-out path; this prints the rows that
decide it on the machine at hand: SDPA as it picks its kernel (flash on CPU),
SDPA's math backend, and `causal_attention`, for q, k, v of batch 32 x 4 heads
x 64 positions x 64 dims. Rounds alternate between the variants; each figure
is the median of its timed calls, then the median over rounds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from loss_speed import median_seconds
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmlab.machine import machine_line
from lmlab.models.attention import causal_attention, prefers_written_out
from lmlab.models.dropout import Dropout

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


VARIANTS: dict[str, Attention] = {
    "SDPA, its own kernel choice (reference)": sdpa,
    "SDPA, math backend": sdpa_math,
    "lmlab causal_attention, written out": lambda q, k, v: causal_attention(q, k, v, Dropout(0.0)),
}


def time_once(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """Seconds of one forward and backward."""
    q.grad = k.grad = v.grad = None
    start = time.perf_counter()
    attention(q, k, v).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few calls, one round, tiny shapes")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    calls, rounds = (2, 1) if args.quick else (args.calls, args.rounds)
    shape = (2, 2, 8, 8) if args.quick else (32, 4, 64, 64)

    print(machine_line())
    print(
        f"causal attention of q, k, v {' x '.join(map(str, shape))}, forward and backward; "
        f"median of {calls} calls after 2, median of {rounds} rounds"
    )
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (
            torch.randn(shape, generator=generator).to(dtype).requires_grad_() for _ in range(3)
        )
        medians = median_seconds(VARIANTS, time_once, (q, k, v), calls, rounds)
        reference = next(iter(medians.values()))
        chosen = "written out" if prefers_written_out(q, 0.0) else "SDPA"
        print(f"\n{str(dtype).removeprefix('torch.') + ' (training uses: ' + chosen + ')':<50}"
              f"{'ms':>9}{'x reference':>13}")  # fmt: skip
        print("-" * 72)
        for name, value in medians.items():
            print(f"{name:<50}{1000 * value:>9.2f}{reference / value:>13.3f}")


if __name__ == "__main__":
    main()
