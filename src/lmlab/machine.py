"""Which machine this is: the CPU model and its instruction sets, torch, the threads.

Every benchmark table starts with `machine_line()`, and the precision chooser
(`lmlab.precision`) keys its cached measurement on `cpu_model()`. Speed figures differ from one CPU to the next (bf16 matmuls run at half the fp32 rate on
one AVX-512 CPU, four times it on another, a hundredth of it on an AVX2 one), so a table
that does not say where it was measured cannot be compared with another.
"""

from __future__ import annotations

import functools
import platform
import subprocess

import torch


@functools.cache  # the CPU does not change while a process runs; lscpu costs ~10 ms
def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


def cpu_model() -> str:
    """The CPU as `lscpu` names it, with its family, model and widest vector instructions."""
    fields = _lscpu()
    name = fields.get("Model name", platform.processor() or "unknown CPU").strip()
    family = fields.get("CPU family", "").strip()
    model = fields.get("Model", "").strip()
    flags = fields.get("Flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    if native_bf16(flags):
        isa += " with BF16"
    where = (f", family {family}" if family else "") + (f" model {model}" if model else "")
    return f"{name}{where}, {isa}"


def cpu_flags() -> list[str] | None:
    """The CPU's feature flags as `lscpu` lists them; None where it lists none (not x86 Linux)."""
    flags = _lscpu().get("Flags", "").split()
    return flags or None


def cpu_family() -> int | None:
    """The CPU family number `lscpu` gives (AMD: 25 Zen 4, 26 Zen 5), or None where it gives none."""
    family = _lscpu().get("CPU family", "").strip()
    return int(family) if family.isdigit() else None


def cpu_vendor() -> str:
    """The CPU's vendor as `lscpu` gives it (`GenuineIntel`, `AuthenticAMD`), or "" where it gives none."""
    return _lscpu().get("Vendor ID", "").strip()


def native_bf16(flags: list[str] | None) -> bool:
    """Whether these x86 flags include bf16 matmul instructions (AVX-512 BF16 or AMX)."""
    return bool(flags) and ("avx512_bf16" in flags or "amx_bf16" in flags)


def machine_line() -> str:
    """One line for the head of a benchmark table."""
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"machine: {cpu_model()}{gpu}; torch {torch.__version__}; {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":  # python -m lmlab.machine
    print(machine_line())
