"""The line every benchmark table starts with: which CPU (and GPU), which torch, how many threads.

Speed figures differ from one CPU to the next (bf16 matmuls run at half the fp32 rate on
one AVX-512 CPU, four times it on another, a hundredth of it on an AVX2 one), so a table
that does not say where it was measured cannot be compared with another.
"""

from __future__ import annotations

import platform
import subprocess

import torch


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", platform.processor() or "unknown CPU").strip()
    family = fields.get("CPU family", "").strip()
    flags = fields.get("Flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        isa += " with BF16"
    return f"{name}" + (f", family {family}" if family else "") + f", {isa}"


def machine_line() -> str:
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"machine: {cpu_model()}{gpu}; torch {torch.__version__}; {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    print(machine_line())
