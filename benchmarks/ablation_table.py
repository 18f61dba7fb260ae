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
from minivlm.ablate.grid import override_value
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
    labels = ["change"] if grid.design == "one_at_a_time" else list(grid.axes) or ["variant"]
    header = [*labels, "params", "GFLOP/sample", "image tokens", "min per run", *(c for c, _ in COLUMNS), "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for s in summaries:
        lines.append("| " + " | ".join(_row(grid, s, s.variant.name == baseline)) + " |")
    return "\n".join(lines)


def _row(grid, s: VariantSummary, is_baseline: bool) -> list[str]:
    if grid.design == "one_at_a_time":
        names = [", ".join(f"{k}={override_value(v)}" for k, v in s.variant.settings) or "base"]
    else:
        names = [override_value(v) for _, v in s.variant.settings] or ["base"]
    if is_baseline:
        names = [f"**{n}**" for n in names]
    shape = ["-"] * 3
    if s.shape is not None:
        tokens = (str(s.shape.image_tokens) if s.shape.image_seq_len == s.shape.image_tokens
                  else f"{s.shape.image_tokens} ({s.shape.image_seq_len} in text)")
        shape = [f"{s.shape.params / 1e6:.2f}M", f"{s.shape.flops_per_sample / 1e9:.3f}", tokens]
    minutes = s.stat(lambda r: r.seconds / 60 if r.seconds is not None else None)
    return [*names, *shape, f"{minutes.mean:.0f}" if minutes else "-",
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
