"""The CUDA half of benchmarks/gpu_check.sh: bf16 training speed and decoding on one GPU, one table.

    python benchmarks/gpu_check.py [--out FILE.md]     # needs a CUDA device; ~3 minutes

Training: `small` and `medium` GPT models, plain loop, bf16 autocast, the fused loss (the
model's own forward with targets), AdamW; tokens/s from the median of timed steps, MFU
against a bf16 matmul peak measured here, peak memory from the allocator. Decoding: greedy
`generate` with the KV cache against Hugging Face's GPT2LMHeadModel.generate, same shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from generate_speed import BLOCK_SIZE, PROMPT_LEN, VOCAB_SIZE, Case, hf_model, hf_run, lmlab_run
from generate_speed import median_seconds as decode_seconds
from train_speed import BATCH_SIZE, SEQ_LEN, flops_per_token

from lmlab.machine import machine_line
from lmlab.models.gpt import GPTLM, PRESETS, GPTConfig

CUDA = torch.device("cuda")


def bf16_peak(size: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of a square bf16 matmul on this GPU: what MFU is measured against."""
    a = torch.randn(size, size, device=CUDA, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=CUDA, dtype=torch.bfloat16)
    times = []
    for i in range(repeats + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def train_row(size: str, peak: float, steps: int = 30, warmup: int = 5) -> list[str]:
    torch.manual_seed(0)
    config = GPTConfig(**{**PRESETS[size], "vocab_size": VOCAB_SIZE, "block_size": SEQ_LEN})
    model = GPTLM(config).to(CUDA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    batch = torch.randint(0, VOCAB_SIZE, (BATCH_SIZE, SEQ_LEN + 1), device=CUDA)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(inputs, targets=targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    assert torch.isfinite(loss), f"{size}: loss {loss.item()}"
    tokens_per_s = BATCH_SIZE * SEQ_LEN / statistics.median(times)
    mfu = flops_per_token(config) * tokens_per_s / peak
    memory = torch.cuda.max_memory_allocated() / 2**20
    return [
        f"train {size} bf16",
        f"{tokens_per_s:,.0f} tokens/s",
        f"MFU {mfu:.1%}",
        f"{memory:,.0f} MiB",
    ]


def decode_rows(new_tokens: int = 128, repeats: int = 3) -> list[list[str]]:
    torch.manual_seed(0)
    config = GPTConfig(**{**PRESETS["small"], "vocab_size": VOCAB_SIZE, "block_size": BLOCK_SIZE})
    model = GPTLM(config).to(CUDA).eval()
    reference = hf_model()
    rows = []
    for batch_size in (1, 8):
        case = Case("greedy", batch_size)
        prompt = torch.randint(0, VOCAB_SIZE, (batch_size, PROMPT_LEN), device=CUDA)
        runs = {"lmlab": lmlab_run(model, case, prompt, True)}
        if reference is not None:
            runs["hf"] = hf_run(reference.to(CUDA), case, prompt)
        seconds = decode_seconds(runs, new_tokens, repeats)
        ours = batch_size * new_tokens / seconds["lmlab"]
        theirs = "transformers not installed"
        if reference is not None:
            theirs = f"HF {batch_size * new_tokens / seconds['hf']:,.0f} tokens/s"
        rows.append([f"greedy decode, batch {batch_size}", f"{ours:,.0f} tokens/s", theirs, ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/gpu_check.py needs a CUDA device")
    peak = bf16_peak()
    rows = [["bf16 matmul peak", f"{peak / 1e12:,.1f} TFLOP/s", "", ""]]
    rows += [train_row(size, peak) for size in ("small", "medium")]
    rows += decode_rows()
    lines = [
        machine_line(),
        "",
        "| what | speed | vs | memory |",
        "|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
