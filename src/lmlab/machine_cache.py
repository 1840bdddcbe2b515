"""Measurements kept per machine: a JSON file in the cache folder, keyed by what they hold for.

`trainer.precision=auto` (`precision.json`) and `compile=auto` (`compile.json`) each time
something once per processor, torch version and thread count, and later runs, and every
process of one machine, read the same answer instead of measuring again (a measurement
that differed between processes would let them decide differently).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmlab.atomic import write_atomically
from lmlab.machine import cpu_model


def machine_key(*what: str, device: torch.device | None = None) -> str:
    """`processor | torch version | threads | what...`: the processor is the GPU where
    `device` is one, else the CPU."""
    on_gpu = device is not None and device.type == "cuda"
    chip = torch.cuda.get_device_name(device) if on_gpu else cpu_model()
    threads = torch.get_num_threads()
    return " | ".join([chip, f"torch {torch.__version__}", f"{threads} threads", *what])


class MachineCache:
    """One JSON object of measurements in `folder / name`; unreadable or missing reads as empty
    (then the caller measures again and the file is rewritten whole)."""

    def __init__(self, folder: str | Path, name: str) -> None:
        self.path = Path(folder).expanduser() / name

    def read(self) -> dict[str, Any]:
        try:
            values = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return values if isinstance(values, dict) else {}

    def store(self, key: str, value: Any) -> None:
        """Add or replace `key`, keeping what the file already holds (written atomically)."""
        values = {**self.read(), key: value}
        write_atomically(self.path, json.dumps(values, indent=2) + "\n")
