"""The run's own record, `metrics.jsonl`: the one place that writes and reads its lines.

One JSON object per line, `kind` says which: `train` (per optimizer step:
`step`, `epoch`, `tokens`, `time_s`, `train/loss`, `train/lr`), `val` (per
validation: the `val/` metrics) and `best` (the checkpoint callback's best
score and file). `lmlab.recorder.RunRecorder` writes it during training;
`lmlab.plot` and `lmlab.summary` read it. Plain Python: reading a record
does not import torch or Lightning.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import UserError

METRICS_FILE = "metrics.jsonl"


def append_records(run_dir: str | Path, records: list[dict]) -> None:
    """Append `records` to the run's `metrics.jsonl`, one line each."""
    path = Path(run_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


@dataclass
class Curves:
    """The series behind the figure of one run (the data `plot_curves` draws)."""

    label: str
    train_step: list[int] = field(default_factory=list)
    train_tokens: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_tokens: list[int] = field(default_factory=list)
    val_ppl: list[float] = field(default_factory=list)
    best_step: int | None = None
    best_tokens: int | None = None
    best_ppl: float | None = None
    best_checkpoint: str | None = None


def _keep_latest(records: list[dict], record: dict) -> None:
    """Append `record`; records at or past its step came before a resume from an earlier step."""
    while records and records[-1]["step"] >= record["step"]:
        records.pop()
    records.append(record)


def read_records(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: is {run_dir} a run folder written by train.py?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path}, line {number}: not JSON; is the file damaged?") from None
    return records


def load_curves(run_dir: str | Path, label: str | None = None) -> Curves:
    """The curves of one run folder; the best checkpoint is the validation it was saved at."""
    train: list[dict] = []
    val: list[dict] = []
    best = None
    for record in read_records(run_dir):
        kind = record.get("kind")
        if kind == "train" and record.get("train/loss") is not None:
            _keep_latest(train, record)
        elif kind == "val" and record.get("val/ppl") is not None:
            _keep_latest(val, record)
        elif kind == "best":
            best = record
    curves = Curves(
        label=label if label is not None else Path(run_dir).name,
        train_step=[r["step"] for r in train],
        train_tokens=[r["tokens"] for r in train],
        train_loss=[r["train/loss"] for r in train],
        lr=[r.get("train/lr") for r in train],
        val_step=[r["step"] for r in val],
        val_tokens=[r["tokens"] for r in val],
        val_ppl=[r["val/ppl"] for r in val],
    )
    if best is not None:
        # The checkpoint callback keeps the first validation reaching the best score.
        monitor, score = best["monitor"], best["score"]
        match = next(
            (r for r in val if r.get(monitor) is not None and math.isclose(r[monitor], score)),
            None,
        )
        if match is not None:
            curves.best_step = match["step"]
            curves.best_tokens = match["tokens"]
            curves.best_ppl = match["val/ppl"]
        curves.best_checkpoint = best.get("checkpoint")
    return curves
