"""What a run achieved: the end-of-run summary, printed as a table and written to `summary.json`.

`RunSummary.collect` takes the figures the run measured (steps, perplexities,
checkpoint paths, token counts and clocks) and reads the rest from the run's own
record (`metrics.jsonl`, see `lmlab.record`). It imports neither Lightning nor
the callbacks: train.py hands it the values.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch.nn as nn
from rich.console import Console
from rich.table import Table

from lmlab.atomic import write_atomically
from lmlab.humanize import format_duration
from lmlab.parameters import parameter_counts
from lmlab.record import METRICS_FILE, load_curves

SUMMARY_FILE = "summary.json"
DEFAULT_PROMPT = "the company said"


def _number(value: object) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _shown_path(path: str | Path | None) -> str | None:
    """`path` relative to the current folder when it lies below it, else absolute."""
    if not path:
        return None
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def generate_command(checkpoint: str, prompt: str = DEFAULT_PROMPT) -> str:
    """The command line that decodes from `checkpoint`, quoted for a POSIX shell."""
    return f'python generate.py {shlex.quote(f"ckpt={checkpoint}")} prompt="{prompt}"'


@dataclass
class RunSummary:
    """The figures of one run; every value comes from the run itself. None: not measured."""

    run_dir: str
    steps: int
    epochs: int
    tokens_seen: int | None
    best_val_ppl: float | None
    best_step: int | None
    final_val_ppl: float | None
    test_ppl: float | None
    validations: int | None
    wall_time_s: float | None
    train_time_s: float | None
    tokens_per_s: float | None
    precision: str | None
    parameters: int | None
    parameters_without_embeddings: int | None
    best_checkpoint: str | None
    last_checkpoint: str | None
    curves: str | None
    samples: str | None
    generate_command: str | None

    @classmethod
    def collect(
        cls,
        run_dir: str | Path,
        *,
        steps: int,
        epochs: int,
        test_ppl: float | None = None,
        precision: str | None = None,
        model: nn.Module | None = None,
        best_val_ppl: float | None = None,
        best_checkpoint: str | Path | None = None,
        last_checkpoint: str | Path | None = None,
        tokens_seen: int | None = None,
        train_time_s: float | None = None,
        wall_time_s: float | None = None,
        record_dir: str | Path | None = None,
        curves: str | Path | None = None,
        samples: str | Path | None = None,
        prompt: str = DEFAULT_PROMPT,
    ) -> RunSummary:
        """The summary from what a finished run measured.

        `record_dir` holds the run's `metrics.jsonl` (best step, final val/ppl,
        number of validations come from it); `curves` and `samples` are files the
        run drew and wrote, shown when they exist; `prompt` goes into the decoding
        command.
        """
        best_step = final_val_ppl = validations = None
        if record_dir is not None and (Path(record_dir) / METRICS_FILE).is_file():
            record = load_curves(record_dir)
            best_step = record.best_step
            final_val_ppl = record.val_ppl[-1] if record.val_ppl else None
            validations = len(record.val_ppl)
        parameters = without = None
        if model is not None:
            counts = parameter_counts(model)
            parameters = sum(counts.values())
            without = parameters - counts["embeddings"]
        shown_best = _shown_path(best_checkpoint)
        return cls(
            run_dir=str(_shown_path(run_dir)),
            steps=steps,
            epochs=epochs,
            tokens_seen=tokens_seen,
            best_val_ppl=_number(best_val_ppl),
            best_step=best_step,
            final_val_ppl=_number(final_val_ppl),
            test_ppl=_number(test_ppl),
            validations=validations,
            wall_time_s=_number(wall_time_s),
            train_time_s=_number(train_time_s),
            tokens_per_s=_number(tokens_seen / train_time_s)
            if tokens_seen is not None and train_time_s
            else None,
            precision=precision,
            parameters=parameters,
            parameters_without_embeddings=without,
            best_checkpoint=shown_best,
            last_checkpoint=_shown_path(last_checkpoint),
            curves=_shown_path(curves) if curves and Path(curves).is_file() else None,
            samples=_shown_path(samples) if samples and Path(samples).is_file() else None,
            generate_command=generate_command(shown_best, prompt) if shown_best else None,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: str | Path) -> None:
        write_atomically(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> RunSummary:
        values = json.loads(Path(path).read_text())
        return cls(**{f.name: values.get(f.name) for f in fields(cls)})

    def table(self) -> Table:
        def ppl(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        def count(value: int | None) -> str:
            return "-" if value is None else f"{value:,}"

        table = Table(title=f"Run summary: {self.run_dir}", title_justify="left", show_header=False)
        table.add_column("figure", style="bold")
        table.add_column("value", overflow="fold")
        best = ppl(self.best_val_ppl)
        if self.best_val_ppl is not None and self.best_step is not None:
            best += f" (step {self.best_step:,})"
        rows = [
            ("best val/ppl", best),
            ("final val/ppl", ppl(self.final_val_ppl)),
            ("test/ppl", ppl(self.test_ppl)),
            (
                "steps",
                f"{self.steps:,} ({self.epochs} epochs, {count(self.validations)} validations)",
            ),
            ("tokens seen", count(self.tokens_seen)),
            ("wall time", format_duration(self.wall_time_s, decimals=2)),
            ("training time", format_duration(self.train_time_s, decimals=2)),
            ("tokens/s", "-" if self.tokens_per_s is None else f"{self.tokens_per_s:,.0f}"),
            ("precision", self.precision or "-"),
            (
                "parameters",
                f"{count(self.parameters)} ({count(self.parameters_without_embeddings)} without embeddings)",
            ),
            ("best checkpoint", self.best_checkpoint or "-"),
            ("last checkpoint", self.last_checkpoint or "-"),
            ("curves", self.curves or "-"),
            ("samples", self.samples or "-"),
        ]
        for name, value in rows:
            table.add_row(name, value)
        return table

    def print(self, console: Console | None = None) -> None:
        console = console or Console()
        console.print(self.table())
        if self.generate_command:
            # Plain print: a wrapped table cell could not be pasted into a shell.
            print(f"decode from the best checkpoint:\n  {self.generate_command}", flush=True)
