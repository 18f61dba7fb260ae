"""The README's compact table of an ablation result directory: one row per variant, the tasks a
reader compares first, mean ± standard error over the finished seeds.

Run from the repository root::

    python -m benchmarks.ablation_table benchmarks/ablations/results/projectors

``results.md`` in the same directory has every column (losses, tokens/s, each question type); this
is the subset the README quotes, from the same runs (:func:`minivlm.ablate.load_results`). The
baseline (the grid's base config, e.g. the main job's model) is in bold; ``runs`` counts finished
seeds, so a sweep still in progress says how far it is.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from minivlm.ablate import load_results
from minivlm.ablate.report import axis_cells, axis_columns, shape_cells
from minivlm.ablate.results import SeedStat, VariantSummary

#: (column, metric key) in the order the README shows them.
COLUMNS = (
    ("easy-VQA", "easy_vqa/accuracy"), ("colour", "easy_vqa/color"), ("shape", "easy_vqa/shape"),
    ("yes/no", "easy_vqa/yes_no"), ("video", "video/accuracy"), ("multi-image", "multi_image/accuracy"),
    ("charts", "charts/accuracy"), ("shapes", "shapes/accuracy"), ("caption CIDEr", "retrieval/caption_cider"),
    ("i2t R@5", "retrieval/i2t_r@5"),
)


def _cell(stat: SeedStat | None) -> str:
    if stat is None:
        return "-"
    return f"{stat.mean:.3f} ± {stat.se:.3f}" if stat.n > 1 else f"{stat.mean:.3f}"


def table(out_dir: str | Path) -> str:
    """The markdown table: header, rule, one row per variant (findings: ``results.md``)."""
    grid, summaries = load_results(out_dir)
    baseline = grid.baseline().name
    header = [*axis_columns(grid), "params", "GFLOP/sample", "image tokens", "min per run", *(c for c, _ in COLUMNS), "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for s in summaries:
        lines.append("| " + " | ".join(_row(grid, s, s.variant.name == baseline)) + " |")
    return "\n".join(lines)


def _row(grid, s: VariantSummary, is_baseline: bool) -> list[str]:
    names = axis_cells(grid, s)
    if is_baseline:
        names = [f"**{n}**" for n in names]
    minutes = s.stat(lambda r: r.seconds / 60 if r.seconds is not None else None)
    return [*names, *(shape_cells(s.shape) if s.shape else ["-"] * 3), f"{minutes.mean:.0f}" if minutes else "-",
            *(_cell(s.stat(lambda r, k=key: r.metrics.get(k))) for _, key in COLUMNS),
            f"{len(s.finished)}/{len(s.runs)}"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="an ablation result directory (holding grid.json)")
    args = parser.parse_args(argv)
    print(table(args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
