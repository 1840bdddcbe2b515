"""Which machine this is: the CPU model and its instruction sets, torch, the threads.

Every benchmark table starts with `machine_line()`, and the precision chooser
(`lmlab.precision`) keys its cached measurement on `cpu_model()`. Speed figures differ from one CPU to the next (bf16 matmuls run at half the fp32 rate on
one AVX-512 CPU, four times it on another, a hundredth of it on an AVX2 one), so a table
that does not say where it was measured cannot be compared with another.
"""

from __future__ import annotations

import platform
import subprocess

import torch


def cpu_model() -> str:
    """The CPU as `lscpu` names it, with its family, model and widest vector instructions."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", platform.processor() or "unknown CPU").strip()
    family = fields.get("CPU family", "").strip()
    model = fields.get("Model", "").strip()
    flags = fields.get("Flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        isa += " with BF16"
    where = (f", family {family}" if family else "") + (f" model {model}" if model else "")
    return f"{name}{where}, {isa}"


def machine_line() -> str:
    """One line for the head of a benchmark table."""
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"machine: {cpu_model()}{gpu}; torch {torch.__version__}; {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":  # python -m lmlab.machine
    print(machine_line())
