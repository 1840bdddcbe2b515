"""The output layer's loss, forward and backward: lmlab's fused loss against torch's, same run.

    python benchmarks/loss_speed.py                 # fp32; the `small` model's shapes
    python benchmarks/loss_speed.py --bf16          # also under bf16 autocast
    python benchmarks/loss_speed.py --tokens 400 --width 200 --bias   # the LSTM's (Zaremba small)
    python benchmarks/loss_speed.py --quick         # a smoke run

torch 2.13 ships `F.linear_cross_entropy`, with a reference path (the logits,
then `F.cross_entropy`) and a chunked one (`options=nn.LinearCrossEntropyOptions()`)
that never holds the whole logits. lmlab keeps its own `lmlab.loss` only where it
is measurably faster; this prints the rows that decide it: the time of one
forward and backward of each, for the hidden states of a batch of 32 x 64 tokens,
width 256, PTB's 10,000 words. The lmlab rows show its float32 matmuls through
the kernel `lmlab.onednn` picks for this CPU, and through each kernel forced (under
bf16 autocast every lmlab row runs the same bf16 matmuls). Rounds alternate between the variants so that the
machine's drift hits all alike; each figure is the median of its timed calls,
then the median over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab import onednn
from lmlab.loss import linear_cross_entropy
from lmlab.machine import machine_line

VOCAB_SIZE = 10_000
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def lmlab_loss(kernel: bool | None) -> Loss:
    """lmlab's loss with its float32 matmuls through this machine's kernel (None), or forced
    through oneDNN (True) or torch.mm (False): `lmlab.onednn`."""

    def loss(h, w, b, t):
        context = contextlib.nullcontext() if kernel is None else onednn.forced(kernel)
        with context:
            return linear_cross_entropy(h, w, t, bias=b)

    return loss


VARIANTS: dict[str, Loss] = {
    "plain: logits, then F.cross_entropy (reference)": lambda h, w, b, t: F.cross_entropy(
        F.linear(h, w, b).float(), t
    ),
    "torch F.linear_cross_entropy, reference path": lambda h, w, b, t: F.linear_cross_entropy(
        h, w, t, linear_bias=b
    ),
    "torch F.linear_cross_entropy, chunked": lambda h, w, b, t: F.linear_cross_entropy(
        h, w, t, linear_bias=b, options=nn.LinearCrossEntropyOptions()
    ),
    "lmlab.loss.linear_cross_entropy": lmlab_loss(None),
    "lmlab.loss, fp32 matmuls by torch.mm": lmlab_loss(False),
    "lmlab.loss, fp32 matmuls by oneDNN": lmlab_loss(True),
}


def time_once(
    loss: Loss,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
) -> float:
    """Seconds of one forward and backward, gradients of the hidden states, weight and bias."""
    hidden.grad = weight.grad = None
    if bias is not None:
        bias.grad = None
    start = time.perf_counter()
    loss(hidden, weight, bias, targets).backward()
    return time.perf_counter() - start


def median_seconds(
    variants: dict[str, Callable[..., object]],
    time_once: Callable[..., float],
    inputs: tuple[torch.Tensor, ...],
    calls: int,
    rounds: int,
) -> dict[str, float]:
    """Each variant's seconds: 2 warm-up calls, then rounds alternating between the variants,
    the median of `calls` timed calls per round, and the median over rounds."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for variant in variants.values():  # warm-up: allocations, first-call set-up
        for _ in range(2):
            time_once(variant, *inputs)
    for _ in range(rounds):
        for name, variant in variants.items():
            samples = [time_once(variant, *inputs) for _ in range(calls)]
            seconds[name].append(statistics.median(samples))
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few calls, one round")
    parser.add_argument("--bf16", action="store_true", help="also time under bf16 autocast")
    parser.add_argument("--tokens", type=int, default=32 * 64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument(
        "--bias", action="store_true", help="an output bias (the untied LSTM's output layer)"
    )
    parser.add_argument("--calls", type=int, default=10, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    calls, rounds = (2, 1) if args.quick else (args.calls, args.rounds)

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.width, generator=generator).requires_grad_()
    weight = (0.02 * torch.randn(VOCAB_SIZE, args.width, generator=generator)).requires_grad_()
    targets = torch.randint(0, VOCAB_SIZE, (args.tokens,), generator=generator)
    bias = torch.zeros(VOCAB_SIZE).requires_grad_() if args.bias else None
    modes = [("fp32", contextlib.nullcontext)]
    if args.bf16:
        modes.append(("bf16 autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16)))

    print(machine_line())
    print(
        f"loss of {args.tokens} tokens x width {args.width} x vocab {VOCAB_SIZE}"
        f"{', with a bias' if args.bias else ''}, forward and backward; median of {calls} "
        f"calls after 2, median of {rounds} rounds"
    )
    kernel = "oneDNN" if onednn.uses_onednn(hidden, weight) else "torch.mm"
    print(f"lmlab's fp32 matmuls on this machine: {kernel} (lmlab.onednn)")
    for mode, context in modes:
        with context():
            medians = median_seconds(
                VARIANTS, time_once, (hidden, weight, bias, targets), calls, rounds
            )
        reference = next(iter(medians.values()))
        print(f"\n{mode:<50}{'ms':>9}{'x reference':>13}")
        print("-" * 72)
        for name, value in medians.items():
            print(f"{name:<50}{1000 * value:>9.1f}{reference / value:>13.3f}")


if __name__ == "__main__":
    main()
