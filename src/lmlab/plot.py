"""Training curves from runs' own records: python -m lmlab.plot RUN_DIR [RUN_DIR ...] [-o out.png].

Reads `metrics.jsonl` (the run's record, see `lmlab.record`) and draws
train loss, val perplexity and the learning rate against optimizer steps (top
row) and tokens seen (bottom row), with the best checkpoint marked. Several
runs overlay in one figure; a sweep folder stands for every job below it that
has a record.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from lmlab.errors import UserError, report_user_errors
from lmlab.record import METRICS_FILE, Curves, load_curves


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders: each path that has a record, or every folder below it that has one."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if (path / METRICS_FILE).is_file():
            runs.append(path)
            continue
        found = sorted((p.parent for p in path.rglob(METRICS_FILE)), key=_natural_key)
        if not found:
            raise UserError(f"no {METRICS_FILE} in or below {path}: pass run folders of train.py")
        runs.extend(found)
    return runs


def run_label(run: Path, root: Path) -> str:
    """A run's name: its folder; for a job found below `root`, that path plus its overrides."""
    if run == root:
        return run.name
    name = f"{root.name}/{run.relative_to(root)}"
    overrides = run / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        from omegaconf import OmegaConf

        chosen = [str(o) for o in OmegaConf.load(overrides) if not str(o).startswith("hydra.")]
        if chosen:
            name += ": " + " ".join(chosen)
    return name


def _smooth(values: list[float], window: int) -> list[float]:
    """Running mean over the last `window` values (shorter at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(runs: list[Curves], out: str | Path) -> Path:
    """Draw `runs` into one PNG at `out` (folders are made); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, LogFormatter

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (axis_name, train_x, val_x, best_x) in enumerate(
        [
            ("step", "train_step", "val_step", "best_step"),
            ("tokens", "train_tokens", "val_tokens", "best_tokens"),
        ]
    ):
        loss_ax, ppl_ax, lr_ax = axes[row]
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            x = getattr(run, train_x)
            if run.train_loss:
                window = max(1, len(run.train_loss) // 50)
                if window > 1:
                    loss_ax.plot(x, run.train_loss, color=color, alpha=0.25, linewidth=0.8)
                loss_ax.plot(x, _smooth(run.train_loss, window), color=color, label=run.label)
            if run.val_ppl:
                ppl_ax.plot(getattr(run, val_x), run.val_ppl, "o-", color=color, markersize=3)
            if any(v is not None for v in run.lr):
                lr_ax.plot(x, run.lr, color=color)
            best = getattr(run, best_x)
            if best is not None:
                ppl_ax.plot(
                    [best], [run.best_ppl], "*", color=color, markersize=14,
                    markeredgecolor="black", label=f"{run.label}: best {run.best_ppl:.2f}",
                )  # fmt: skip
                for ax in (loss_ax, lr_ax):
                    ax.axvline(best, color=color, linestyle=":", linewidth=1)
        xlabel = "optimizer step" if axis_name == "step" else "tokens seen"
        for ax, title in zip(
            (loss_ax, ppl_ax, lr_ax), ("train loss", "val perplexity", "learning rate")
        ):
            ax.set_title(f"{title} vs {axis_name}")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if axis_name == "tokens":
                ax.xaxis.set_major_formatter(EngFormatter())
        if any(run.val_ppl for run in runs):
            ppl_ax.set_yscale("log")
            ppl_ax.yaxis.set_major_formatter(LogFormatter())
            ppl_ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        if any(getattr(run, best_x) is not None for run in runs):
            ppl_ax.legend(fontsize="small")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("dotted line, star: best checkpoint", fontsize="small", y=0.995)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lmlab.plot" if Path(sys.argv[0]).name == "plot.py" else None,
        description="Overlay the training curves of runs (and of every job of a sweep folder).",
    )
    parser.add_argument("runs", nargs="+", help="run folders, or sweep folders holding them")
    parser.add_argument("-o", "--output", default="curves.png", help="PNG to write (curves.png)")
    args = parser.parse_args(argv)
    output = Path(args.output).expanduser()
    if output.is_dir():  # a folder: the usual name inside it
        output = output / "curves.png"
    if output.suffix.lower() != ".png":
        raise UserError(f"-o must name a .png file, got {args.output}; e.g. -o plots/curves.png")
    curves = [
        load_curves(run, label=run_label(run, root))
        for root in map(Path, args.runs)
        for run in find_runs([root])
    ]
    out = plot_curves(curves, output)
    print(f"wrote {out} ({len(curves)} run{'s' if len(curves) != 1 else ''})")


if __name__ == "__main__":
    main()
