"""What an ablation may claim: one-at-a-time grids, the baseline each variant is compared with,
differences beyond two standard errors called findings, and the cost-against-quality figure."""

from __future__ import annotations

import json
import math

import pytest

from minivlm.ablate import AblationGrid, GridError, Variant, collect, compare, results_markdown, write_report
from minivlm.ablate.findings import Comparison, findings_markdown
from minivlm.ablate.results import SeedStat
from tests.ablate.test_ablate import MICRO, fake_run, micro_grid


# ---- one-at-a-time grids and the baseline ----------------------------------------------------------


def test_one_at_a_time_is_the_base_plus_each_value_changed_alone():
    overrides = {**MICRO, "encoder.patch_size": 8}  # the conv stems halve the resolution per layer
    grid = AblationGrid.from_dict(micro_grid(design="one_at_a_time", overrides=overrides, axes={
        "encoder.stem": ["patch", "conv", "hybrid"],  # patch is the base's (MICRO) stem: no variant of its own
        "train.loss_weighting": ["token", "square"],  # the preset's is square
    }))
    assert [v.name for v in grid.variants()] == [
        "base", "encoder.stem=conv", "encoder.stem=hybrid", "train.loss_weighting=token"]
    assert grid.baseline() == Variant(())
    cfg = grid.variant_config(grid.variants()[1], seed=0)
    assert (cfg.encoder.stem, cfg.train.loss_weighting) == ("conv", "square")  # the other axis stays at the base


def test_a_product_grid_compares_with_the_variant_that_is_the_base_config():
    grid = AblationGrid.from_dict(micro_grid(axes={"projector": ["linear", "pixel_shuffle"],
                                                   "fusion": ["cross_attention", "splice"]}))
    assert grid.baseline().name == "projector=pixel_shuffle__fusion=splice"  # tiny's own projector and fusion
    other = AblationGrid.from_dict(micro_grid(axes={"projector": ["linear", "mlp"]}))
    assert other.baseline().name == "projector=linear"  # no variant is the base: the first one


def test_an_unknown_design_is_refused_naming_the_choices():
    with pytest.raises(GridError, match="design must be one of product | one_at_a_time, got 'latin_square'"):
        AblationGrid.from_dict(micro_grid(design="latin_square"))


# ---- findings --------------------------------------------------------------------------------------


def comparison(variant: tuple[float, float, int], baseline: tuple[float, float, int]) -> Comparison:
    return Comparison("v", "easy_vqa/accuracy", SeedStat(*variant), SeedStat(*baseline))


@pytest.mark.parametrize("variant, baseline, finding", [
    ((0.90, 0.01, 3), (0.80, 0.01, 3), True),    # 0.10 apart, SE of the difference 0.008
    ((0.81, 0.01, 3), (0.80, 0.01, 3), False),   # 0.01 apart: 1.2 SE
    ((0.90, 0.05, 3), (0.80, 0.05, 3), True),    # 0.10 vs 2 x 0.041
    ((0.90, 0.10, 3), (0.80, 0.10, 3), False),   # 0.10 vs 2 x 0.082
    ((0.90, 0.00, 1), (0.80, 0.00, 3), False),   # one seed: no standard error, no claim
])
def test_a_difference_is_a_finding_only_beyond_two_standard_errors(variant, baseline, finding):
    c = comparison(variant, baseline)
    se = math.hypot(variant[1] / math.sqrt(variant[2]), baseline[1] / math.sqrt(baseline[2]))
    assert c.delta == pytest.approx(variant[0] - baseline[0])
    assert c.se == pytest.approx(se)
    assert c.is_finding is finding


def test_identical_seeds_on_different_means_are_infinitely_many_standard_errors():
    c = comparison((0.9, 0.0, 3), (0.8, 0.0, 3))
    assert c.is_finding and math.isinf(c.standard_errors)
    assert "inf SE" in "\n".join(findings_markdown([c], "base"))


@pytest.mark.parametrize("variant, baseline, se, finding", [
    ((0.995, 0.0, 2), (1.000, 0.0, 2), 0.005, False),  # one of 200 items on seeds that agree: 1.0 SE
    ((0.900, 0.0, 2), (0.800, 0.0, 2), 0.005, True),   # twenty items: 20 SE, a finding with a finite SE
    ((0.900, 0.03, 2), (0.800, 0.0, 2), 0.0215, True),  # a wider measured spread than one item is kept
])
def test_seeds_that_agree_exactly_are_taken_to_spread_by_one_evaluated_item(variant, baseline, se, finding):
    c = Comparison("v", "retrieval/t2i_r@10", SeedStat(*variant), SeedStat(*baseline), resolution=1 / 200)
    assert c.se == pytest.approx(se, abs=1e-4)
    assert c.is_finding is finding and math.isfinite(c.standard_errors)


def test_compare_takes_the_resolution_from_the_smaller_evaluation_and_only_for_shares(tmp_path):
    grid = AblationGrid.from_dict(micro_grid(seeds=2))
    for variant, accuracy, items in (("projector=pixel_shuffle", 0.50, 200), ("projector=linear", 0.52, 50)):
        write_seeds(tmp_path, variant, [accuracy, accuracy])
        for seed in (0, 1):
            path = tmp_path / variant / f"seed_{seed}" / "eval.json"
            evaluation = json.loads(path.read_text())
            evaluation["metrics"]["shapes/caption_cider"] = accuracy
            path.write_text(json.dumps({**evaluation, "counts": {"shapes/accuracy": items,
                                                                 "shapes/caption_cider": items}}))
    by_metric = {c.metric: c for c in compare(collect(grid, tmp_path), grid.baseline().name,
                                               ["shapes/accuracy", "shapes/caption_cider", "shapes/count"])}
    assert by_metric["shapes/accuracy"].resolution == pytest.approx(1 / 50)  # linear evaluated 50 items
    assert not by_metric["shapes/accuracy"].is_finding  # one item of 50: 0.02 apart, SE 0.02
    assert by_metric["shapes/caption_cider"].resolution == 0.0  # a caption score is not a share of items
    assert by_metric["shapes/caption_cider"].is_finding  # so exact agreement still decides
    assert by_metric["shapes/count"].resolution == 0.0  # no counts recorded: as before


@pytest.mark.parametrize("metric, items, step", [
    ("retrieval/i2t_median_rank", 200, 0.5),     # a median of integer ranks moves in half ranks
    ("retrieval/i2t_median_rank", None, 0.5),    # whatever was counted
    ("retrieval/t2i_mean_rank", 200, 1 / 200),   # one query of 200 moving one place
    ("retrieval/i2t_r@5", 200, 1 / 200),         # one item of a share
    ("retrieval/caption_cider", 200, 0.0),       # a continuous score keeps its measured spread
])
def test_every_metric_but_a_caption_score_has_a_smallest_step(tmp_path, metric, items, step):
    grid = AblationGrid.from_dict(micro_grid(seeds=2))
    for variant, value in (("projector=pixel_shuffle", 1.0), ("projector=linear", 2.0)):
        write_seeds(tmp_path, variant, [0.5, 0.5])
        for seed in (0, 1):
            path = tmp_path / variant / f"seed_{seed}" / "eval.json"
            evaluation = json.loads(path.read_text())
            evaluation["metrics"][metric] = value
            path.write_text(json.dumps({**evaluation, "counts": {metric: items} if items else {}}))
    (c,) = compare(collect(grid, tmp_path), grid.baseline().name, [metric])
    assert c.resolution == pytest.approx(step)
    assert math.isfinite(c.standard_errors) is (step > 0)


def test_median_ranks_that_agree_on_every_seed_are_a_finite_finding():
    # Seen in the encoder grid: a frozen encoder's median rank 2 on every seed, the baseline's 1.
    c = Comparison("lr_scale", "retrieval/i2t_median_rank", SeedStat(2.0, 0.0, 3), SeedStat(1.0, 0.0, 3),
                   resolution=0.5)
    assert c.se == pytest.approx(math.hypot(0.5 / math.sqrt(3), 0.5 / math.sqrt(3)))
    assert c.is_finding and c.standard_errors == pytest.approx(2.45, abs=0.01)
    assert "2.4 SE" in "\n".join(findings_markdown([c], "base"))


def write_seeds(out_dir, variant: str, accuracies: list[float]) -> None:
    for seed, accuracy in enumerate(accuracies):
        fake_run(out_dir / variant / f"seed_{seed}", accuracy, [2.0, 1.0], 10.0)


def test_the_report_lists_each_finding_and_only_those(tmp_path):
    grid = AblationGrid.from_dict(micro_grid(seeds=3, axes={"projector": ["linear", "mlp", "pixel_shuffle"]}))
    write_seeds(tmp_path, "projector=pixel_shuffle", [0.50, 0.52, 0.54])  # the baseline (tiny's projector)
    write_seeds(tmp_path, "projector=linear", [0.70, 0.72, 0.74])        # +0.20, SE 0.016: a finding
    write_seeds(tmp_path, "projector=mlp", [0.40, 0.56, 0.66])           # -0.01, SE 0.077: not one
    summaries = collect(grid, tmp_path)
    comparisons = compare(summaries, grid.baseline().name, ["shapes/accuracy"])
    assert [(c.variant, c.is_finding) for c in comparisons] == [("projector=linear", True), ("projector=mlp", False)]
    md = results_markdown(grid, summaries)
    findings = md[md.index("## Findings"):]
    assert "against the baseline `projector=pixel_shuffle`" in findings
    assert "- `projector=linear`: shapes/accuracy 0.720 vs 0.520 (+0.200 ± 0.016, 12.2 SE)" in findings
    assert "`projector=mlp`: shapes/accuracy" not in findings
    assert "Of 6 comparisons about 0 would pass 2 SE by chance alone" in findings  # 2 variants x 3 metrics
    assert "0.720 ± 0.012" in md  # the table's error is the standard error: 0.02 / sqrt(3)


def test_the_report_says_when_nothing_is_a_finding(tmp_path):
    grid = AblationGrid.from_dict(micro_grid(seeds=2))
    write_seeds(tmp_path, "projector=pixel_shuffle", [0.5, 0.6])
    write_seeds(tmp_path, "projector=linear", [0.55, 0.65])
    md = results_markdown(grid, collect(grid, tmp_path))
    assert "None: no difference among the 3 compared exceeds 2 standard errors." in md  # 2 metrics + eval loss


def test_comparing_with_a_baseline_that_is_not_a_variant_is_refused(tmp_path):
    grid = AblationGrid.from_dict(micro_grid())
    with pytest.raises(ValueError, match="baseline 'projector=mlp' is not one of the variants"):
        compare(collect(grid, tmp_path), "projector=mlp", ["shapes/accuracy"])


# ---- the figure ------------------------------------------------------------------------------------


def test_the_cost_quality_figure_has_a_point_per_variant_at_its_flops(tmp_path):
    grid = AblationGrid.from_dict(micro_grid(seeds=2, axes={"projector": ["linear", "mlp", "pixel_shuffle"]}))
    write_seeds(tmp_path, "projector=linear", [0.7, 0.8])
    write_seeds(tmp_path, "projector=pixel_shuffle", [0.5, 0.6])  # mlp has no runs: no point
    paths = write_report(grid, tmp_path)
    assert paths["accuracy_vs_flops"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from minivlm.ablate import accuracy_vs_flops_figure

    summaries = collect(grid, tmp_path)
    fig = accuracy_vs_flops_figure(summaries, baseline=grid.baseline().name)
    (ax,) = fig.axes
    points = {bars.get_label(): (bars.lines[0].get_xdata()[0], bars.lines[0].get_ydata()[0])
              for bars in ax.containers}
    flops = {s.variant.label: s.shape.flops_per_sample / 1e9 for s in summaries}
    linear, pixel_shuffle = flops["projector=linear"], flops["projector=pixel_shuffle"]
    assert points == {"projector=linear": pytest.approx((linear, 0.75)),
                      "projector=pixel_shuffle (baseline)": pytest.approx((pixel_shuffle, 0.55))}
    assert linear > pixel_shuffle  # 4x the image tokens
    low, high = ax.get_ylim()
    assert high - low >= 0.1 and low <= 0.55 - 0.05 and high >= 0.75 + 0.05  # both points, error bars, margins


def test_time_per_run_counts_every_invocation_of_a_resumed_run(tmp_path):
    grid = AblationGrid.from_dict(micro_grid(seeds=2))
    # seed 0 ran 100 s straight; seed 1 was stopped after 30 s and resumed for 90 s more.
    for seed, elapsed in ((0, [40.0, 100.0]), (1, [10.0, 30.0, 20.0, 90.0])):
        run_dir = tmp_path / "projector=linear" / f"seed_{seed}"
        fake_run(run_dir, 0.5, [1.0] * len(elapsed), 10.0)
        records = [{"step": i + 1, "loss": 1.0, "elapsed_s": e} for i, e in enumerate(elapsed)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        evaluation = json.loads((run_dir / "eval.json").read_text())
        (run_dir / "eval.json").write_text(json.dumps({**evaluation, "seconds": 20.0}))
        (run_dir / "run_info.json").write_text(json.dumps(
            {"finished": "2026-12-04T10:00:00", "machine": "test machine", "wall_seconds": 1.0}))
    summaries = collect(grid, tmp_path)
    assert [r.seconds for r in summaries[0].finished] == [120.0, 140.0]  # 100 + 20, 30 + 90 + 20
    md = results_markdown(grid, summaries)
    assert "| time s |" in md and "| 130 ± 10 |" in md
