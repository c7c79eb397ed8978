"""The report of a `peftlab compare` grid: results.json, a Markdown table and PNG plots.

Cells of one method and training-set size are summarised over their seeds (mean and sample
standard deviation). The plot functions return matplotlib Figures drawn on the Agg canvas (no
pyplot, no display), so callers and tests can read their axes before they are saved.
matplotlib is an extra (`pip install "peftlab[compare]"`), imported where a plot is drawn.
"""

from __future__ import annotations

import importlib
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...core.errors import MissingAssetError
from ...core.files import commit_files, write_text
from .settings import Settings

if TYPE_CHECKING:   # matplotlib is imported when a plot is drawn (an extra)
    from matplotlib.figure import Figure

# The measurements summarised over seeds.
NUMERIC = ("score", "trainable", "trainable_pct", "adapter_params", "head_params", "file_bytes",
           "peak_bytes", "step_ms", "examples_per_s", "tokens_per_s", "latency_base_ms",
           "latency_ms", "latency_merged_ms")
PLOT_DPI = 100
PLOTS = {"score_vs_params": "score vs trainable parameters", "score_vs_step_time": "score vs step time",
         "learning_curves": "learning curves", "score_vs_data_size": "score vs training examples"}


# ---- summary -----------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _curve(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean training loss per step and held-out score (mean, std) per evaluation step over seeds."""
    losses = [statistics.fmean(step) for step in zip(*(r["losses"] for r in records))]
    steps = [step for step, _ in records[0]["evals"]]
    scores = [_stats([r["evals"][i][1] for r in records]) for i in range(len(steps))]
    return {"loss": losses, "eval_steps": steps, "eval_scores": scores}


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, training-set size) of the cells that ran, in grid order."""
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for r in records:
        if r["status"] == "ok":
            groups.setdefault((r["method"], r["size"]), []).append(r)
    rows = []
    for (method, size), rs in groups.items():
        first = rs[0]
        row = {"method": method, "size": size, "train_examples": first["train_examples"],
               "seeds": [r["seed"] for r in rs], "typology": first["typology"], "metric": first["metric"],
               "higher_is_better": first["higher_is_better"], "merge_note": first.get("merge_note")}
        row.update({key: _stats([r[key] for r in rs if r.get(key) is not None]) for key in NUMERIC})
        row["curve"] = _curve(rs)
        rows.append(row)
    return rows


def not_run(records: list[dict[str, Any]]) -> list[str]:
    """'prefix (seeds 0, 1): failed: reason' for the cells that did not run, one line per reason."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for r in records:
        if r["status"] != "ok":
            groups.setdefault((r["method"], r["status"], r["reason"]), []).append(r["seed"])
    return [f"{method} (seed{'s' if len(set(seeds)) > 1 else ''} {', '.join(map(str, sorted(set(seeds))))}): "
            f"{status}: {reason}" for (method, status, reason), seeds in groups.items()]


# ---- table ---------------------------------------------------------------------------------------------
def _num(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _mean(row: dict[str, Any], key: str, fmt: str) -> str:
    stat = row[key]
    return "n/a" if stat is None else format(stat["mean"], fmt)


def _score(row: dict[str, Any]) -> str:
    s = row["score"]
    return _num(s["mean"]) + (f" ± {_num(s['std'])}" if s["n"] > 1 else "")


TABLE_HEAD = ("method", "form", "site", "integration", "train ex.", "trainable", "% of base", "file",
              "peak mem", "step (ms)", "ex/s", "tok/s", "latency (ms)", "merged (ms)")


def table_rows(rows: list[dict[str, Any]]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The table's header and cells as text."""
    metric = rows[0]["metric"] if rows else "score"
    body = []
    for row in rows:
        t = row["typology"]
        peak = row["peak_bytes"]
        body.append((
            row["method"], t["form"], t["site"], t["integration"], f"{row['train_examples']:,}",
            _mean(row, "trainable", ",.0f"), _mean(row, "trainable_pct", ".3f"),
            _bytes(row["file_bytes"]["mean"]), "n/a" if peak is None else _bytes(peak["mean"]),
            _mean(row, "step_ms", ".0f"), _mean(row, "examples_per_s", ".1f"),
            _mean(row, "tokens_per_s", ",.0f"), _mean(row, "latency_ms", ".1f"),
            _mean(row, "latency_merged_ms", ".1f"), _score(row)))
    return (*TABLE_HEAD, metric), body


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The summary rows as a Markdown table."""
    head, body = table_rows(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


# ---- plots ---------------------------------------------------------------------------------------------
def require_matplotlib() -> None:
    """Raise MissingAssetError with the install command when matplotlib is not installed."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise MissingAssetError('peftlab compare draws its plots with matplotlib, which is not '
                                'installed; install the extra: pip install "peftlab[compare]"') from None


def _figure(ncols: int = 1) -> tuple[Figure, Any]:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4 * ncols, 4.4))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _colours(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One colour per method, the same in every plot."""
    require_matplotlib()
    from matplotlib import colormaps
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _largest_size(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each method's row at its largest training set."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["method"] not in best or row["train_examples"] > best[row["method"]]["train_examples"]:
            best[row["method"]] = row
    return list(best.values())


def _score_label(rows: list[dict[str, Any]]) -> str:
    return f"held-out {rows[0]['metric']}" if rows else "held-out score"


def _scatter(rows: list[dict[str, Any]], x_key: str, xlabel: str, title: str, *, log_x: bool) -> Figure:
    fig, ax = _figure()
    colours = _colours(rows)
    for row in _largest_size(rows):
        ax.errorbar(row[x_key]["mean"], row["score"]["mean"], xerr=row[x_key]["std"] or None,
                    yerr=row["score"]["std"] or None, fmt="o", capsize=3, color=colours[row["method"]],
                    label=row["method"])
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_score_label(rows))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_score_vs_params(rows: list[dict[str, Any]]) -> Figure:
    """Held-out score against trainable parameters (log scale), error bars over seeds."""
    return _scatter(rows, "trainable", "trainable parameters (log scale)",
                    "Score vs trainable parameters", log_x=True)


def plot_score_vs_step_time(rows: list[dict[str, Any]]) -> Figure:
    """Held-out score against mean training step time."""
    return _scatter(rows, "step_ms", "training step time (ms)", "Score vs training step time", log_x=False)


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing running mean: single-batch losses are too noisy to compare by eye."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_learning_curves(rows: list[dict[str, Any]]) -> Figure:
    """Training loss (running mean, over seeds) and held-out score against steps, for each
    method at its largest training set."""
    fig, (loss_ax, score_ax) = _figure(ncols=2)
    colours = _colours(rows)
    for row in _largest_size(rows):
        curve, colour = row["curve"], colours[row["method"]]
        window = max(1, len(curve["loss"]) // 20)
        loss_ax.plot(range(1, len(curve["loss"]) + 1), _smooth(curve["loss"], window), color=colour,
                     label=row["method"])
        score_ax.errorbar(curve["eval_steps"], [s["mean"] for s in curve["eval_scores"]],
                          yerr=[s["std"] for s in curve["eval_scores"]], marker="o", capsize=3,
                          color=colour, label=row["method"])
    loss_ax.set_xlabel("training step")
    loss_ax.set_ylabel("training loss (running mean)")
    loss_ax.set_title("Training loss")
    score_ax.set_xlabel("training step")
    score_ax.set_ylabel(_score_label(rows))
    score_ax.set_title("Held-out score during training")
    for ax in (loss_ax, score_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_data_scaling(rows: list[dict[str, Any]]) -> Figure:
    """Held-out score against the number of training examples (log scale), one line per method."""
    fig, ax = _figure()
    colours = _colours(rows)
    for method in colours:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["train_examples"])
        ax.errorbar([r["train_examples"] for r in mine], [r["score"]["mean"] for r in mine],
                    yerr=[r["score"]["std"] for r in mine], marker="o", capsize=3,
                    color=colours[method], label=method)
    ax.set_xscale("log")
    ax.set_xlabel("training examples (log scale)")
    ax.set_ylabel(_score_label(rows))
    ax.set_title("Score vs training examples")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def figures(rows: list[dict[str, Any]]) -> dict[str, Figure]:
    """Plot name -> figure; the data-size plot only for a sweep over several sizes."""
    if not rows:
        return {}
    out = {"score_vs_params": plot_score_vs_params(rows), "score_vs_step_time": plot_score_vs_step_time(rows),
           "learning_curves": plot_learning_curves(rows)}
    if len({r["train_examples"] for r in rows}) > 1:
        out["score_vs_data_size"] = plot_data_scaling(rows)
    return out


# ---- files ---------------------------------------------------------------------------------------------
def _notes(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[str]:
    """What each column measures, below the table."""
    if not rows:
        return []
    base = [r["latency_base_ms"]["mean"] for r in rows]
    merge = {}
    for row in rows:
        if row["latency_merged_ms"] is None:
            merge.setdefault(row["merge_note"], {})[row["method"]] = None   # a set that keeps order
    return [
        ("trainable: numel of the parameters that receive gradients (for the baselines, the rank-1 "
         "LoRA carrier `train` needs is left out: its B is frozen at 0); % of base: over the base "
         "model's parameters; file: the saved adapter on disk (the probe's holds the carrier too; "
         "full: the whole model, safetensors)."),
        f"peak mem: {env['memory_measure']}.",
        ("step: mean wall time of a training step (evaluation excluded); ex/s and tok/s: training "
         "examples and non-padding input tokens per second."),
        "latency: median forward time of one batch of held-out rows (batch size as in training), "
        f"adapter unmerged; merged: folded into the base weights (the base model alone, measured "
        f"in every cell: {min(base):.1f} to {max(base):.1f} ms)"
        + "".join(f"; n/a for {', '.join(ms)}: {note}" for note, ms in merge.items()) + ".",
    ]


def markdown_report(settings: Settings, grid: dict[str, Any], records: list[dict[str, Any]],
                    env: dict[str, Any], *, seconds: float, command: str, plots: list[str]) -> str:
    """results.md: the command, the settings and environment, the table, what its columns
    measure, the cells that did not run and the plots."""
    rows = summarise(records)
    seeds = len(grid["seeds"])
    git = env["git"] or {}
    lines = [
        f"# {Path(settings.model).name} + {Path(settings.task).name}: methods side by side", "",
        "```bash", command, "```", "",
        f"{settings.steps} steps of batch {settings.batch_size} per cell (learning rate: the "
        f"method's own, as `peftlab train`), {settings.eval_size} held-out test rows scored, "
        f"{settings.evals} evaluations during training; "
        + (f"mean ± std over {seeds} seeds ({', '.join(map(str, grid['seeds']))})." if seeds > 1
           else f"seed {grid['seeds'][0]}."),
        f"{sum(r['seconds'] for r in records) / 60:.1f} min of cell time in all; this invocation took "
        f"{seconds / 60:.1f} min (cells finished earlier are reused). "
        f"{env['cpu']}, {env['usable_cores']} usable cores, torch threads: {env['torch_threads']}, "
        f"GPU: {env['gpu'] or 'none'} (training on {env['device']}); Python {env['python']}, "
        f"torch {env['torch']}, transformers {env['transformers']}, peftlab {env['peftlab']}"
        + (f", commit {git['commit'][:10]}{' with uncommitted changes' if git['dirty'] else ''}" if git else "")
        + ".", "",
        markdown_table(rows), "",
        *(f"* {note}" for note in _notes(rows, env)),
    ]
    skipped = not_run(records)
    if skipped:
        lines += ["", "Not run:", "", *(f"* {line}" for line in skipped)]
    lines += ["", *(f"![{PLOTS[name]}]({name}.png)" for name in plots)]
    return "\n".join(lines) + "\n"


def write_report(out: Path, settings: Settings, grid: dict[str, Any], records: list[dict[str, Any]],
                 env: dict[str, Any], *, seconds: float, command: str) -> list[Path]:
    """Write results.json, results.md and the plots into `out`; return their paths."""
    rows = summarise(records)
    figs = figures(rows)
    data = {"command": command, "settings": asdict(settings), "grid": grid, "environment": env,
            "wall_seconds": round(seconds, 1), "summary": rows, "cells": records}
    plots = {f"{name}.png": _png_writer(fig) for name, fig in figs.items()}
    files = {
        **plots,
        "results.json": write_text(json.dumps(data, indent=1) + "\n"),
        "results.md": write_text(markdown_report(settings, grid, records, env, seconds=seconds,
                                                 command=command, plots=list(figs))),
    }
    for name, write in files.items():   # each atomic; together they would swap all of `out`, cells too
        commit_files(out, {name: write})
    return [out / "results.json", out / "results.md", *(out / name for name in plots)]


def _png_writer(fig: Figure) -> Callable[[Path], None]:
    """A writer of the figure as PNG (the format named: the temporary file's name hides it)."""
    def write(path: Path) -> None:
        fig.savefig(path, dpi=PLOT_DPI, format="png")
    return write
