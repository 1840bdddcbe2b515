"""Peak memory and step time of a `small` training step eager, compiled per block and compiled whole.

    python benchmarks/compile_memory.py                      # WikiText-103's scale: 250,000 words
    python benchmarks/compile_memory.py --vocab 10000        # PTB's
    python benchmarks/compile_memory.py --quick              # a smoke run

lmlab compiles each block (`lmlab.models.interface.compile_blocks`), leaving the
embedding lookup and the chunked fused loss (`lmlab.loss`) eager; the reference is
torch.compile of the whole model (`model.compile()`), which traces the loss too.
Each variant runs in a fresh process (its peak resident memory is its own): the
`small` GPT at `--vocab` words, a batch of 32 x 64 random tokens, bf16 autocast
where the CPU has bf16 instructions (what `precision=auto` picks there), fused
AdamW; the first step (the compile) timed apart, then the median of the rest.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch

from lmlab.machine import cpu_flags, machine_line, native_bf16
from lmlab.models.gpt import GPTLM, PRESETS, GPTConfig
from lmlab.models.interface import compile_blocks

VARIANTS = ("eager", "per block (lmlab)", "whole model (reference)")


def run(variant: str, vocab: int, steps: int) -> None:
    """One variant in this process; prints `first_step_s median_step_s peak_MiB`."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab, block_size=64, **PRESETS["small"])
    model = GPTLM(config).train()
    if variant == VARIANTS[1]:
        compile_blocks(model)
    elif variant == VARIANTS[2]:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    tokens = torch.randint(0, vocab, (32, 65), generator=torch.Generator().manual_seed(0))
    bf16 = native_bf16(cpu_flags())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{times[0]} {statistics.median(times[1:])} {peak}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=250_000)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="vocabulary 1,000, 3 steps")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # the child process's
    args = parser.parse_args()
    vocab, steps = (1_000, 3) if args.quick else (args.vocab, args.steps)
    if args.variant:
        run(args.variant, vocab, steps)
        return
    print(machine_line())
    print(
        f"model small, vocab {vocab:,}, batch 32 x 64, "
        f"{'bf16 autocast' if native_bf16(cpu_flags()) else 'float32'}, fused AdamW; "
        f"first step apart, median of the next {steps - 1}; each variant in a fresh process"
    )
    print(f"{'variant':26} {'first step s':>13} {'step ms':>9} {'peak MiB':>9} {'x ref MiB':>10}")
    print("-" * 71)
    rows = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--vocab", str(vocab)]
        command += ["--steps", str(steps)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows[variant] = [float(x) for x in out.split()[-3:]]
    reference = rows[VARIANTS[2]][2]
    for variant, (first, step, peak) in rows.items():
        ratio = peak / reference
        print(f"{variant:26} {first:13.1f} {step * 1e3:9.1f} {peak:9.0f} {ratio:10.3f}")


if __name__ == "__main__":
    main()
