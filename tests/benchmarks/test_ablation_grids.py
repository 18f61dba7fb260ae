"""The shipped ablation grids (benchmarks/ablations/) stay runnable: every variant of every grid is
a valid config on the main job's recipe and budget, with the seeds the study reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from minivlm.ablate import AblationGrid
from minivlm.config import TINY_STEPS, preset

GRIDS = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "ablations").glob("*.yaml"))


@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_each_shipped_grid_plans_valid_runs_on_the_main_recipe(path):
    grid = AblationGrid.load(path)
    assert len(grid.seeds) >= 3  # error bars need seeds
    assert grid.steps == TINY_STEPS  # the main job's budget: every variant gets past the plateau
    baseline = grid.baseline()
    base = preset("tiny")
    for variant in grid.variants():
        cfg = grid.variant_config(variant, seed=0)
        assert cfg.train.max_minutes is None
        assert cfg.data.mixture == base.data.mixture and cfg.data.curriculum == base.data.curriculum
    assert grid.variant_config(baseline, seed=0).encoder == base.encoder  # the baseline is the main job's model


def test_the_study_covers_the_axes_the_readme_reports():
    grids = {p.stem: AblationGrid.load(p) for p in GRIDS}
    assert len(grids["projectors"].variants()) == 12
    axes = grids["encoder_and_training"].axes
    assert set(axes) == {"encoder.stem", "encoder.image_size", "encoder.temporal_patch_size", "train.lr_scale",
                         "train.loss_weighting"}
    assert [v.name for v in grids["encoder_and_training"].variants()][0] == "base"


RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "ablations" / "results"


@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_committed_results_belong_to_the_grid_as_it_is_now(path):
    """A fresh clone resumes the study from the committed runs: they must have been made under the
    grid's current budget and base config (else the sweep refuses the directory), and each must be
    a variant and seed the grid plans."""
    from minivlm.ablate import check_output_dir, run_dir_of

    out_dir = RESULTS / path.stem
    if not (out_dir / "grid.json").is_file():
        pytest.skip(f"no committed results for {path.stem} yet")
    grid = AblationGrid.load(path)
    check_output_dir(grid, out_dir)
    planned = {run_dir_of(out_dir, v, seed) for v in grid.variants() for seed in grid.seeds}
    committed = {p.parent for p in out_dir.glob("*/seed_*/eval.json")}
    assert committed and committed <= planned


def test_the_encoder_grid_copies_its_base_from_the_projector_baseline_and_nothing_else():
    from minivlm.ablate import plan_runs
    from minivlm.ablate.reuse import reusable_runs

    if not (RESULTS / "projectors" / "grid.json").is_file():
        pytest.skip("no committed projector results")
    grid = AblationGrid.load(GRIDS[[p.stem for p in GRIDS].index("encoder_and_training")])
    assert Path(grid.reuse_runs_from).resolve() == (RESULTS / "projectors").resolve()
    out_dir = RESULTS / "encoder_and_training"
    twins = reusable_runs(grid, plan_runs(grid, out_dir), grid.reuse_runs_from)
    assert {(d.parent.name, d.name): (t.parent.name, t.name) for d, t in twins.items()} == {
        ("base", f"seed_{s}"): ("projector=pixel_shuffle__fusion=splice", f"seed_{s}") for s in grid.seeds}
