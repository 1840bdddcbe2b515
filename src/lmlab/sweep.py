"""The summary of a sweep: every job's `result.json` gathered into a table and a figure.

Each job of a sweep (`-m`) writes its `result.json` (`lmlab.result`); a failed
job is recorded and the other jobs still run. `SweepSummary`, a Hydra callback,
then writes summary.csv, summary.md and summary.png into the sweep folder and
exits with code 1 if a job failed (`allow_failed_jobs: true`, as in an Optuna
search, only if every job failed).
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lmlab.checks import is_number
from lmlab.result import COMPLETED, MISSING, read_result
from lmlab.run_folder import RESULT_FILE

SUMMARY_COLUMNS = ["best_val_ppl", "test_ppl", "steps", "wall_time_s", "status"]


# -- the summary of a sweep ---------------------------------------------------


class SweepSummary(Callback):
    """Hydra callback: at the end of a sweep, tabulate and plot every job in the sweep folder.

    Writes summary.csv, summary.md and summary.png. With a `seed` override that
    varies, also the mean and standard deviation across seeds of each setting
    (summary_seeds.csv and a section of summary.md). Then exits with code 1 if a
    job failed, or, with `allow_failed_jobs`, if every job failed.
    """

    def __init__(self, allow_failed_jobs: bool = False) -> None:
        self.allow_failed_jobs = allow_failed_jobs

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            rows, swept = collect(sweep_dir)
            if not rows:
                return
            markdown = write_summary(sweep_dir, rows, swept)
        except Exception:
            # Hydra would only warn; a sweep without its summary should not look fine
            traceback.print_exc()
            print(f"error: could not write the summary of {sweep_dir}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        print(markdown, flush=True)
        failed = [row for row in rows if row["status"] != COMPLETED]
        if failed and (not self.allow_failed_jobs or len(failed) == len(rows)):
            print(
                f"error: {len(failed)} of {len(rows)} jobs failed "
                f"(see {sweep_dir / 'summary.md'}); the other results are in the summary",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(1)


def split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def collect(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per job folder under `sweep_dir`, and the override keys that vary across jobs."""
    folders = {p.parent for p in sweep_dir.rglob(RESULT_FILE)}
    folders |= {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    folders.discard(sweep_dir)
    rows = []
    for folder in sorted(folders, key=lambda f: _natural_key(f.relative_to(sweep_dir))):
        result = read_result(folder)
        if result is None:
            overrides_file = folder / ".hydra" / "overrides.yaml"
            overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
            result = {
                "status": MISSING,
                "error": "no result.json: the job was killed or interrupted",
                "best_val_ppl": math.nan,
                "test_ppl": math.nan,
                "overrides": overrides,
            }
        rows.append({**result, "job": str(folder.relative_to(sweep_dir))})
    for row in rows:
        row["params"] = dict(split_override(o) for o in row.get("overrides") or [])
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["params"] if k not in keys]
    swept = [k for k in keys if len({row["params"].get(k) for row in rows}) > 1]
    shown = swept or keys
    for row in rows:
        row["shown_overrides"] = " ".join(
            f"{k}={row['params'][k]}" for k in shown if k in row["params"]
        )
    return rows, swept


def _natural_key(path: Path) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return ""
    return _fmt(mean) if math.isnan(std) else f"{_fmt(mean)} ± {_fmt(std)}"


def seed_groups(rows: list[dict[str, Any]], swept: list[str]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation across seeds, per setting of the other swept keys."""
    others = [k for k in swept if k != "seed"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row["params"].get(k) for k in others), []).append(row)
    table = []
    for values, members in groups.items():
        done = [r for r in members if r["status"] == COMPLETED]
        entry: dict[str, Any] = {
            "overrides": " ".join(f"{k}={v}" for k, v in zip(others, values, strict=True))
            or "(all)",
            "seeds": " ".join(str(r["params"].get("seed")) for r in members),
            "completed": f"{len(done)}/{len(members)}",
        }
        for metric in ("best_val_ppl", "test_ppl"):
            numbers = [r[metric] for r in done if is_number(r.get(metric))]
            entry[f"{metric}_mean"] = statistics.fmean(numbers) if numbers else math.nan
            entry[f"{metric}_std"] = statistics.stdev(numbers) if len(numbers) > 1 else math.nan
        table.append(entry)
    return table


def _markdown_table(header: Sequence[str], lines: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in line) + " |" for line in lines]
    return out


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]], swept: list[str]) -> str:
    """Write summary.csv, summary.md, summary.png (and summary_seeds.csv); return the Markdown."""
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "overrides", *swept, *SUMMARY_COLUMNS, "error", "output_dir"])
        for row in rows:
            writer.writerow(
                [row["job"], row["shown_overrides"]]
                + [row["params"].get(k, "") for k in swept]
                + [_fmt(row.get(c), 6) for c in SUMMARY_COLUMNS]
                + [row.get("error") or "", row.get("output_dir", "")]
            )

    done = [r for r in rows if r["status"] == COMPLETED and is_number(r.get("best_val_ppl"))]
    lines = [f"# Sweep {sweep_dir}", ""]
    lines.append(
        f"{len(rows)} jobs: {len(done)} completed, {len(rows) - len(done)} failed. "
        "Metric: best val/ppl (lower is better)."
    )
    if done:
        best = min(done, key=lambda r: r["best_val_ppl"])
        lines.append(
            f"Best: job {best['job']} ({best['shown_overrides']}), "
            f"val/ppl {best['best_val_ppl']:.2f}."
        )
    lines.append("")
    lines += _markdown_table(
        ["job", "overrides", "status", "best val ppl", "test ppl", "steps", "wall time (s)"],
        [
            [
                r["job"],
                r["shown_overrides"],
                r["status"],
                _fmt(r.get("best_val_ppl")),
                _fmt(r.get("test_ppl")),
                _fmt(r.get("steps")),
                _fmt(r.get("wall_time_s"), 1),
            ]
            for r in rows
        ],
    )
    failed = [r for r in rows if r["status"] != COMPLETED]
    if failed:
        lines += ["", "## Failed jobs", ""]
        lines += [f"- job {r['job']} ({r['shown_overrides']}): {r.get('error')}" for r in failed]

    if "seed" in swept:
        groups = seed_groups(rows, swept)
        metrics = [f"{m}_{s}" for m in ("best_val_ppl", "test_ppl") for s in ("mean", "std")]
        with (sweep_dir / "summary_seeds.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["overrides", "seeds", "completed", *metrics])
            for g in groups:
                writer.writerow(
                    [g["overrides"], g["seeds"], g["completed"]] + [_fmt(g[m], 6) for m in metrics]
                )
        lines += ["", "## Across seeds (mean ± sample std of completed jobs)", ""]
        lines += _markdown_table(
            ["overrides", "seeds", "completed", "best val ppl", "test ppl"],
            [
                [
                    g["overrides"],
                    g["seeds"],
                    g["completed"],
                    _mean_std(g["best_val_ppl_mean"], g["best_val_ppl_std"]),
                    _mean_std(g["test_ppl_mean"], g["test_ppl_std"]),
                ]
                for g in groups
            ],
        )
    lines += ["", "![best val/ppl against the swept values](summary.png)", ""]
    markdown = "\n".join(lines)
    (sweep_dir / "summary.md").write_text(markdown)
    plot_summary(sweep_dir / "summary.png", rows, swept)
    return markdown


def _as_number(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def plot_summary(path: Path, rows: list[dict[str, Any]], swept: list[str]) -> None:
    """Best val/ppl against each swept value, one panel per swept key; failed jobs as red x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    keys = swept or ["job"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    finite = [r["best_val_ppl"] for r in rows if is_number(r.get("best_val_ppl"))]
    fail_y = max(finite) * 1.05 if finite else 1.0
    for ax, key in zip(axes[0], keys, strict=True):
        raw = [r["job"] if key == "job" else r["params"].get(key) for r in rows]
        numbers = [_as_number(v) for v in raw]
        # a continuous axis for searches (many values), one tick per value for grids
        numeric = key != "job" and all(n is not None for n in numbers) and len(set(raw)) > 6
        if numeric:
            xs = numbers
            positive = [n for n in numbers if n > 0]
            if len(positive) == len(numbers) and max(positive) / min(positive) >= 10:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        else:
            labels = sorted(
                {str(v) for v in raw}, key=lambda s: (_as_number(s) is None, _as_number(s) or 0, s)
            )
            xs = [labels.index(str(v)) for v in raw]
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ok = [
            (x, r["best_val_ppl"])
            for x, r in zip(xs, rows, strict=True)
            if is_number(r.get("best_val_ppl"))
        ]
        bad = [x for x, r in zip(xs, rows, strict=True) if not is_number(r.get("best_val_ppl"))]
        if ok:
            ax.scatter(*zip(*ok, strict=True), color="tab:blue", label="completed")
        if bad:
            ax.scatter(bad, [fail_y] * len(bad), color="tab:red", marker="x", label="failed")
        ax.set_xlabel(key)
        ax.set_ylabel("best val/ppl")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{path.parent.name}: best val/ppl per job")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
