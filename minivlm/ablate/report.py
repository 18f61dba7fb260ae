"""Writing a sweep's report: ``runs.csv``, ``results.csv``, ``results.md`` and the loss-curve and
metric figures."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from minivlm.ablate.grid import GRID_FILE, AblationGrid, override_value
from minivlm.ablate.findings import compare, findings_markdown
from minivlm.ablate.results import (
    FINAL_LOSS_FRACTION,
    RunRecord,
    SeedStat,
    VariantShape,
    VariantSummary,
    collect,
    detail_metrics,
    headline_metrics,
)
from minivlm.io_atomic import atomic_path, atomic_write_text


#: Bar-chart panels drawn by default before falling back to the headline metrics only.
MAX_DEFAULT_PANELS = 9
#: Smallest accuracy range a cost-quality panel shows, so near-equal results look near-equal.
MIN_ACCURACY_SPAN = 0.1


# ---- reporting --------------------------------------------------------------------------------


def _fmt(stat: SeedStat | None, digits: int = 3, n_seeds: int = 1) -> str:
    """``mean ± standard error``; the mean alone when one seed has finished (no error to give)."""
    if stat is None:
        return "-"
    return f"{stat.mean:.{digits}f} ± {stat.se:.{digits}f}" if stat.n > 1 else f"{stat.mean:.{digits}f}"


def write_report(grid: AblationGrid, out_dir: str | Path) -> dict[str, Path]:
    """Write ``runs.csv``, ``results.csv``, ``results.md``, ``loss_curves.png``, ``metrics.png``
    and ``accuracy_vs_flops.png``."""
    out_dir = Path(out_dir)
    summaries = collect(grid, out_dir)
    paths = {
        "runs_csv": _write_runs_csv(summaries, out_dir / "runs.csv"),
        "results_csv": _write_results_csv(grid, summaries, out_dir / "results.csv"),
        "results_md": out_dir / "results.md",
        "loss_curves": out_dir / "loss_curves.png",
        "metrics": out_dir / "metrics.png",
        "accuracy_vs_flops": out_dir / "accuracy_vs_flops.png",
    }
    atomic_write_text(paths["results_md"], results_markdown(grid, summaries))
    figures = (("loss_curves", loss_curves_figure(summaries, title=f"{grid.name}: training loss")),
               ("metrics", metric_bars_figure(summaries)),
               ("accuracy_vs_flops", accuracy_vs_flops_figure(summaries, baseline=grid.baseline().name)))
    for key, figure in figures:
        with atomic_path(paths[key]) as tmp:
            figure.savefig(tmp, dpi=110, format="png")
    return paths


def _write_runs_csv(summaries: Sequence[VariantSummary], path: Path) -> Path:
    metrics = sorted({k for s in summaries for r in s.runs for k in r.metrics})
    fields = ["variant", "seed", "status", "steps", "tokens_per_s", "final_loss", "eval_loss"]
    info = ["finished", "wall_seconds", "machine", "code"]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*fields, *metrics, *info, "error"])
        writer.writeheader()
        for s in summaries:
            for r in s.runs:
                writer.writerow({**{k: getattr(r, k) for k in fields}, **r.metrics,
                                 **{k: r.info.get(k) for k in info}, "error": r.error})
    return path


def _per_variant_columns(summaries: Sequence[VariantSummary]) -> list[tuple[str, Callable[[RunRecord], float | None]]]:
    columns: list[tuple[str, Callable[[RunRecord], float | None]]] = [
        ("tokens_per_s", lambda r: r.tokens_per_s), ("seconds", lambda r: r.seconds),
        ("final_train_loss", lambda r: r.final_loss), ("eval_loss", lambda r: r.eval_loss),
    ]
    for name in headline_metrics(summaries) + detail_metrics(summaries):
        columns.append((name, lambda r, name=name: r.metrics.get(name)))
    return columns


def _write_results_csv(grid: AblationGrid, summaries: Sequence[VariantSummary], path: Path) -> Path:
    stats = _per_variant_columns(summaries)
    columns = ["variant", *grid.axes, "params", "flops_per_sample", "image_tokens", "image_seq_len",
               "finished_seeds", "failed_seeds"]
    for name, _ in stats:
        columns += [f"{name}_mean", f"{name}_std", f"{name}_se"]
    columns.append("errors")
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for s in summaries:
            row: dict[str, Any] = {"variant": s.variant.name, **{k: override_value(v) for k, v in s.variant.settings},
                                   **(asdict(s.shape) if s.shape else {}),
                                   "finished_seeds": len(s.finished), "failed_seeds": len(s.errors),
                                   "errors": " | ".join(s.errors)}
            for name, get in stats:
                stat = s.stat(get)
                row[f"{name}_mean"], row[f"{name}_std"], row[f"{name}_se"] = \
                    (stat.mean, stat.std, stat.se) if stat else (None, None, None)
            writer.writerow(row)
    return path


def results_markdown(grid: AblationGrid, summaries: Sequence[VariantSummary]) -> str:
    """The report: settings, the main table (one row per variant) and per-question-type metrics."""
    n_seeds = len(grid.seeds)
    budget = (f"{grid.steps} steps" if grid.steps else f"{grid.tokens:,} training tokens" if grid.tokens
              else f"{grid.base_config().train.steps} steps (config)")
    lines = [
        f"# Ablation `{grid.name}`",
        "",
        _conditions_line(summaries),
        f"- base preset `{grid.base}`, data `{grid.base_config().data.mixture}`, budget {budget}, "
        f"seeds {list(grid.seeds)}, eval limit {grid.eval_limit or 'full test split'}",
        f"- fixed overrides: {', '.join(f'`{o}`' for o in grid.overrides) or 'none'}",
        "- GFLOP/sample: forward FLOPs of one image + 64 text tokens (`minivlm summary`); "
        "tok/s: median training step rate; time s: one run's training (every invocation of a resumed run) and "
        "evaluation; train loss: mean logged "
        f"loss over the last {FINAL_LOSS_FRACTION:.0%} of steps; eval loss: teacher-forced loss per answer token "
        "on the test samples" + ("; values are mean ± standard error over seeds" if n_seeds > 1 else ""),
        "",
    ]
    headline = headline_metrics(summaries)
    axes = axis_columns(grid)
    header = [*axes, "params", "GFLOP/sample", "image tokens", "tok/s", "time s", "train loss", "eval loss",
              *headline, "runs"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for s in summaries:
        cells = axis_cells(grid, s)
        cells += [
            *(shape_cells(s.shape) if s.shape else ["-"] * 3),
            _fmt(s.stat(lambda r: r.tokens_per_s), 0, n_seeds),
            _fmt(s.stat(lambda r: r.seconds), 0, n_seeds),
            _fmt(s.stat(lambda r: r.final_loss), 3, n_seeds),
            _fmt(s.stat(lambda r: r.eval_loss), 3, n_seeds),
            *[_fmt(s.stat(lambda r, m=m: r.metrics.get(m)), 3, n_seeds) for m in headline],
            _runs_cell(s, n_seeds),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    detail = detail_metrics(summaries)
    if detail:
        lines += ["", "Per question type:", "", "| " + " | ".join([*axes, *detail]) + " |",
                  "|" + "|".join("---" for _ in [*axes, *detail]) + "|"]
        for s in summaries:
            cells = axis_cells(grid, s)
            cells += [_fmt(s.stat(lambda r, m=m: r.metrics.get(m)), 3, n_seeds) for m in detail]
            lines.append("| " + " | ".join(cells) + " |")
    baseline = grid.baseline()
    lines += ["", *findings_markdown(compare(summaries, baseline.name, [*headline, *detail, "eval_loss"]),
                                     baseline.label)]
    failures = [(s.variant.name, e) for s in summaries for e in s.errors]
    if failures:
        lines += ["", "Failed runs:", ""] + [f"- `{name}`: {error}" for name, error in failures]
    return "\n".join(lines) + "\n"


def axis_columns(grid: AblationGrid) -> list[str]:
    """The table's first columns: one per axis, or one naming the change in a one-at-a-time grid."""
    if grid.design == "one_at_a_time":
        return ["change"]
    return list(grid.axes) or ["variant"]


def axis_cells(grid: AblationGrid, s: VariantSummary) -> list[str]:
    if grid.design == "one_at_a_time":
        return [", ".join(f"{k}={override_value(v)}" for k, v in s.variant.settings) or "base"]
    return [override_value(v) for _, v in s.variant.settings] or ["base"]


def shape_cells(shape: VariantShape) -> list[str]:
    tokens = (f"{shape.image_tokens}" if shape.image_seq_len == shape.image_tokens
              else f"{shape.image_tokens} ({shape.image_seq_len} in text)")
    return [f"{shape.params / 1e6:.2f}M", f"{shape.flops_per_sample / 1e9:.3f}", tokens]


def _conditions_line(summaries: Sequence[VariantSummary]) -> str:
    """When and where the finished runs were made, and their total time (training + evaluation)."""
    runs = [r for s in summaries for r in s.finished if r.info]
    if not runs:
        return "- runs: none finished yet" if not any(s.finished for s in summaries) else "- runs: not recorded"
    dates = sorted(r.info["finished"][:10] for r in runs)
    when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    machines = "; ".join(sorted({r.info["machine"] for r in runs}))
    minutes = sum(r.seconds if r.seconds is not None else r.info["wall_seconds"] for r in runs) / 60
    line = f"- runs finished {when} on {machines}; {minutes:.0f} min of training and evaluation for {len(runs)} runs"
    reused = [(s.variant.name, r) for s in summaries for r in s.finished if r.info.get("reused_from")]
    if reused:
        sources = sorted({str(Path(r.info["reused_from"]).parent.parent) for _, r in reused})
        line += (f" ({len(reused)} of them copied from {', '.join(f'`{d}`' for d in sources)}, the same training "
                 f"under another name: {', '.join(f'`{name}/seed_{r.seed}`' for name, r in reused)})")
    return line


def _runs_cell(s: VariantSummary, n_seeds: int) -> str:
    parts = [f"{len(s.finished)}/{n_seeds}"]
    if s.errors:
        parts.append(f"failed: {s.errors[0][:80]}")
    return " ".join(parts)


def _smoothed_mean_curve(runs: Sequence[RunRecord]) -> tuple[list[int], list[float]]:
    """Mean over seeds at the steps all of them logged, then a trailing moving mean."""
    from minivlm.train.plot import moving_mean

    common = sorted(set.intersection(*(set(step for step, _ in r.curve) for r in runs)))
    if not common:
        return [], []
    by_run = [dict(r.curve) for r in runs]
    mean = [statistics.fmean(d[step] for d in by_run) for step in common]
    return common, moving_mean(mean, max(1, len(mean) // 20))


def loss_curves_figure(summaries: Sequence[VariantSummary], title: str = "training loss"):
    """Overlaid training-loss curves, one per variant (mean over seeds, lightly smoothed).

    Returns a matplotlib ``Figure`` (no pyplot state: safe in scripts, tests and notebooks).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for color, s in zip(_colors(len(summaries)), summaries, strict=True):
        runs = [r for r in s.finished if r.curve]
        if runs:
            steps, losses = _smoothed_mean_curve(runs)
            ax.plot(steps, losses, color=color, label=s.variant.label, linewidth=1.5)
    ax.set(xlabel="step", ylabel="training loss (per supervised token)", title=title)
    if ax.lines:
        ax.set_yscale("log")
        for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            set_formatter(FormatStrFormatter("%.2g"))  # 2, 3, 4 rather than 2x10^0 on a short log range
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def metric_bars_figure(summaries: Sequence[VariantSummary], metrics: Sequence[str] | None = None):
    """One horizontal bar chart per metric, error bars = standard error over seeds; returns a ``Figure``.

    ``metrics`` defaults to every metric plus ``eval_loss`` when that makes at most
    :data:`MAX_DEFAULT_PANELS` panels (per-question-type accuracy is where a blind model shows),
    else to the headline metrics plus ``eval_loss``.
    """
    from matplotlib.figure import Figure

    if metrics is None:
        every = headline_metrics(summaries) + detail_metrics(summaries) + ["eval_loss"]
        metrics = every if len(every) <= MAX_DEFAULT_PANELS else headline_metrics(summaries) + ["eval_loss"]
    names = list(metrics)
    cols = min(3, max(1, len(names)))
    rows = math.ceil(len(names) / cols) if names else 1
    fig = Figure(figsize=(4.2 * cols, 0.28 * len(summaries) * rows + 1.6 * rows))
    colors = _colors(len(summaries))
    labels = [s.variant.label for s in summaries]
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        get = (lambda r: r.eval_loss) if name == "eval_loss" else (lambda r, m=name: r.metrics.get(m))
        stats = [s.stat(get) for s in summaries]
        means = [st.mean if st else 0.0 for st in stats]
        errors = [st.se if st else 0.0 for st in stats]
        ax.barh(range(len(summaries)), means, xerr=errors, color=colors, capsize=3)
        if name != "eval_loss":  # accuracies on a common 0..1 scale; CIDEr may exceed 1
            ax.set_xlim(0, max([1.0] + [m + e for m, e in zip(means, errors, strict=True)]))
        ax.set_yticks(range(len(summaries)), labels if i % cols == 0 else [""] * len(labels), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9)
        for y, st in enumerate(stats):
            if st is None:
                ax.text(0, y, " no result", va="center", fontsize=7, color="gray")
    if not names:
        fig.add_subplot().text(0.5, 0.5, "no finished runs yet", ha="center", va="center")
    fig.tight_layout()
    return fig


def accuracy_vs_flops_figure(summaries: Sequence[VariantSummary], metrics: Sequence[str] | None = None,
                             baseline: str | None = None):
    """Cost against quality: one panel per accuracy metric, one point per variant at its forward
    GFLOP per sample, error bars = standard error over seeds; the baseline drawn as a ring.

    ``metrics`` defaults to each task's overall accuracy. Returns a matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    if metrics is None:
        metrics = [m for m in headline_metrics(summaries) if m.endswith("/accuracy")]
    names = list(metrics)
    cols = min(3, max(1, len(names)))
    rows = math.ceil(len(names) / cols) if names else 1
    fig = Figure(figsize=(4.6 * cols, 3.8 * rows))
    colors = _colors(len(summaries))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        extent: list[float] = []
        for color, s in zip(colors, summaries, strict=True):
            stat = s.stat(lambda r, m=name: r.metrics.get(m))
            if stat is None or s.shape is None:
                continue
            x = s.shape.flops_per_sample / 1e9
            ring = s.variant.name == baseline
            ax.errorbar(x, stat.mean, yerr=stat.se, fmt="o", color=color, capsize=3, markersize=7,
                        markerfacecolor="white" if ring else color, label=s.variant.label + (" (baseline)" if ring else ""))
            extent += [stat.mean - stat.se, stat.mean + stat.se]
        if extent:  # at least 0.1 of accuracy tall: 0.995 against 1.000 should not look like 0.5 against 1
            middle, half = (min(extent) + max(extent)) / 2, max(max(extent) - min(extent), MIN_ACCURACY_SPAN) / 2
            ax.set_ylim(max(-0.01, middle - half - 0.01), min(1.01, middle + half + 0.01))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("forward GFLOP / sample", fontsize=8)
        ax.set_ylabel("accuracy (mean ± SE)", fontsize=8)
        ax.tick_params(labelsize=7)
    if names and fig.axes[0].lines:
        handles, labels = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(labels) / 4) / rows, 1, 1))
    else:
        ax = fig.axes[0] if fig.axes else fig.add_subplot()
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
    return fig


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def load_results(out_dir: str | Path) -> tuple[AblationGrid, list[VariantSummary]]:
    """The grid and per-variant summaries of an ablation directory (for notebooks)."""
    path = Path(out_dir) / GRID_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} is not an ablation result directory: {GRID_FILE} is missing")
    grid = AblationGrid.from_dict(json.loads(path.read_text()), str(path))
    return grid, collect(grid, out_dir)
