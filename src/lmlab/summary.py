"""What a run is made of and what it achieved: parameter counts, and the end-of-run summary.

`parameter_counts` splits a model's parameters into parts (embeddings,
attention, MLP, norms); `RunSummary` gathers the figures of a finished run from
the trainer, its checkpoint callback and the run's own record (`metrics.jsonl`,
see `lmlab.callbacks.RunRecorder`), prints them as a Rich table and writes
them to `summary.json`.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import lightning as L
import torch.nn as nn
from rich.console import Console
from rich.table import Table

from lmlab.model import MLP, CausalSelfAttention

SUMMARY_FILE = "summary.json"
DEFAULT_PROMPT = "the company said"


# ---------------------------------------------------------------------------
# Parameters per part.


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per part: embeddings, attention, mlp, norms, other; shared tensors count once.

    A parameter belongs to its nearest enclosing attention or MLP block, else to
    its own module's kind (embedding, LayerNorm); anything else (an untied
    output layer) is "other". The tied output layer shares the token embedding
    and is counted with the embeddings.
    """
    counts = dict.fromkeys(("embeddings", "attention", "mlp", "norms", "other"), 0)
    seen: set[int] = set()

    def walk(module: nn.Module, part: str) -> None:
        if isinstance(module, CausalSelfAttention):
            part = "attention"
        elif isinstance(module, MLP):
            part = "mlp"
        elif isinstance(module, nn.Embedding):
            part = "embeddings"
        elif isinstance(module, nn.LayerNorm):
            part = "norms"
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                counts[part] += param.numel()
        for child in module.children():
            walk(child, part)

    walk(model, "other")
    return counts


def parameter_table(model: nn.Module, title: str = "Model parameters") -> Table:
    counts = parameter_counts(model)
    total = sum(counts.values())
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    table.add_column("share", justify="right")
    for part, count in counts.items():
        if count or part != "other":
            table.add_row(part, f"{count:,}", f"{count / max(total, 1):.1%}")
    table.add_section()
    table.add_row("total", f"{total:,}", "100.0%")
    without = total - counts["embeddings"]
    table.add_row("without embeddings", f"{without:,}", f"{without / max(total, 1):.1%}")
    return table


# ---------------------------------------------------------------------------
# The end-of-run summary.


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


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:05.2f}"


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
    parameters: int | None
    parameters_without_embeddings: int | None
    best_checkpoint: str | None
    last_checkpoint: str | None
    curves: str | None
    samples: str | None
    generate_command: str | None

    @classmethod
    def collect(
        cls, trainer: L.Trainer, run_dir: str | Path, test_ppl: float | None = None
    ) -> RunSummary:
        """Gather the figures after `trainer.fit` (and `trainer.test`, whose result is `test_ppl`)."""
        from lmlab.callbacks import RunRecorder, SampleText, find_callback
        from lmlab.plot import load_curves

        run_dir = Path(run_dir)
        recorder = find_callback(trainer, RunRecorder)
        sampler = find_callback(trainer, SampleText)
        checkpoint = trainer.checkpoint_callback

        best_step = final_val_ppl = validations = None
        tokens_seen = wall_time = train_time = tokens_per_s = curves_path = None
        if recorder is not None:
            tokens_seen = recorder.tokens_seen
            train_time = recorder.train_time_s
            tokens_per_s = tokens_seen / train_time if train_time else None
            if recorder.fit_started is not None:
                wall_time = time.perf_counter() - recorder.fit_started
            if recorder.metrics_path.is_file():
                curves = load_curves(recorder.dirpath)
                best_step = curves.best_step
                final_val_ppl = curves.val_ppl[-1] if curves.val_ppl else None
                validations = len(curves.val_ppl)
            if recorder.plot_path.is_file():
                curves_path = _shown_path(recorder.plot_path)

        best_path = getattr(checkpoint, "best_model_path", "") or None
        last_path = getattr(checkpoint, "last_model_path", "") or None
        model = getattr(trainer.lightning_module, "model", None)
        parameters = without = None
        if model is not None:
            counts = parameter_counts(model)
            parameters = sum(counts.values())
            without = parameters - counts["embeddings"]
        prompt = sampler.prompts[0] if sampler is not None and sampler.prompts else DEFAULT_PROMPT
        shown_best = _shown_path(best_path)
        return cls(
            run_dir=str(_shown_path(run_dir)),
            steps=trainer.global_step,
            epochs=trainer.current_epoch,
            tokens_seen=tokens_seen,
            best_val_ppl=_number(getattr(checkpoint, "best_model_score", None)),
            best_step=best_step,
            final_val_ppl=_number(final_val_ppl),
            test_ppl=_number(test_ppl),
            validations=validations,
            wall_time_s=_number(wall_time),
            train_time_s=_number(train_time),
            tokens_per_s=_number(tokens_per_s),
            parameters=parameters,
            parameters_without_embeddings=without,
            best_checkpoint=shown_best,
            last_checkpoint=_shown_path(last_path),
            curves=curves_path,
            samples=_shown_path(sampler.samples_path)
            if sampler is not None and sampler.samples_path.is_file()
            else None,
            generate_command=generate_command(shown_best, prompt) if shown_best else None,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

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
            ("wall time", _duration(self.wall_time_s)),
            ("training time", _duration(self.train_time_s)),
            ("tokens/s", "-" if self.tokens_per_s is None else f"{self.tokens_per_s:,.0f}"),
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
