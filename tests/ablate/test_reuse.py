"""Runs a grid takes from another sweep: a baseline two grids share is trained once, copied (not
its checkpoints) with a note of where from, and the runs left to train are dealt out to shards."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from minivlm.ablate import AblationGrid, GridError, run_ablation
from minivlm.ablate.reuse import config_key
from minivlm.cli import main
from minivlm.train.recipe import run as recipe_run
from tests.ablate.test_ablate import micro_grid, write_grid


def counting_runner(calls: list[str]):
    def runner(cfg, run_dir, **kw):
        calls.append(f"{run_dir.parent.name}/{run_dir.name}")
        return recipe_run(cfg, run_dir, **kw)

    return runner


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished two-variant sweep (pixel_shuffle is the micro base's projector), 2 steps each."""
    out = tmp_path_factory.mktemp("source")
    outcome = run_ablation(AblationGrid.from_dict(micro_grid(steps=2)), out)
    assert sorted(outcome.ran) == ["projector=linear/seed_0", "projector=pixel_shuffle/seed_0"]
    return out


#: The base and linear (both trained in ``source``) and two variants that were not.
AXES = {"projector": ["linear", "pixel_shuffle"], "fusion": ["prefix"], "train.lr": [1e-3]}
#: Only the two that ``source`` trained.
SHARED_AXES = {"projector": ["linear", "pixel_shuffle"]}


def one_at_a_time(source_dir, axes=None, **changes):
    return AblationGrid.from_dict(micro_grid(
        name="other", steps=2, design="one_at_a_time", reuse_runs_from=str(source_dir), axes=axes or AXES, **changes))


def test_runs_that_train_alike_are_copied_not_trained(source, tmp_path):
    calls = []
    outcome = run_ablation(one_at_a_time(source), tmp_path, runner=counting_runner(calls))
    assert sorted(calls) == ["fusion=prefix/seed_0", "train.lr=0.001/seed_0"]  # only the two new ones
    assert sorted(outcome.reused) == ["base/seed_0", "projector=linear/seed_0"]
    for name, twin in (("base", "projector=pixel_shuffle"), ("projector=linear", "projector=linear")):
        copy, original = tmp_path / name / "seed_0", source / twin / "seed_0"
        assert json.loads((copy / "eval.json").read_text()) == json.loads((original / "eval.json").read_text())
        assert json.loads((copy / "reused.json").read_text())["from"] == str(original)
        assert not (copy / "checkpoints").exists() and (copy / "model" / "config.json").is_file()
    md = outcome.reports["results_md"].read_text()
    assert f"2 of them copied from `{source}`" in md and "`base/seed_0`" in md
    assert "| base |" in md and "| 1/1 |" in md.split("| base |")[1].splitlines()[0]


def test_the_cli_says_how_many_runs_it_copied(source, tmp_path, capsys):
    grid_file = write_grid(tmp_path / "other.yaml", micro_grid(
        name="other", steps=2, design="one_at_a_time", reuse_runs_from=str(source), axes=SHARED_AXES))
    assert main(["ablate", str(grid_file), "--out", str(tmp_path / "out")]) == 0
    assert f"ran 0, skipped 0 finished, 0 failed, copied 2 from {source}" in capsys.readouterr().out


def test_a_rerun_copies_nothing_twice(source, tmp_path):
    first = run_ablation(one_at_a_time(source, SHARED_AXES), tmp_path)
    assert len(first.reused) == 2 and first.ran == []
    calls = []
    again = run_ablation(one_at_a_time(source, SHARED_AXES), tmp_path, runner=counting_runner(calls))
    assert calls == [] and again.reused == [] and again.skipped == []


def test_the_match_ignores_the_run_name_only():
    grid = one_at_a_time("x")
    base, lr = (grid.variant_config(v, 0) for v in grid.variants() if v.name in ("base", "train.lr=0.001"))
    other = AblationGrid.from_dict(micro_grid(steps=2)).variant_config(
        AblationGrid.from_dict(micro_grid(steps=2)).baseline(), 0)
    assert base.name != other.name and config_key(base) == config_key(other)
    assert config_key(lr) != config_key(base)


def test_shards_deal_out_only_the_runs_left_to_train(source, tmp_path, capsys):
    grid_file = write_grid(tmp_path / "other.yaml", {**micro_grid(
        name="other", steps=2, design="one_at_a_time", reuse_runs_from=str(source), seeds=2,
        axes={"projector": ["linear", "pixel_shuffle"], "fusion": ["prefix"], "train.lr": [1e-3]})})
    listed = []
    for shard in ("0/2", "1/2"):
        assert main(["ablate", str(grid_file), "--out", str(tmp_path / "out"), "--shard", shard, "--dry-run"]) == 0
        printed = capsys.readouterr().out
        listed.append(re.findall(r"  (\S+): to run", printed))
        assert f"base/seed_0: to copy from {source}" in printed
    # 4 variants x 2 seeds; base and linear of seed 0 belong to the source sweep (it has no seed 1).
    assert [len(runs) for runs in listed] == [3, 3] and not set(listed[0]) & set(listed[1])
    assert "base/seed_1" in listed[0] + listed[1]


def test_an_unfinished_twin_is_neither_trained_nor_copied(source, tmp_path, capsys, caplog):
    unfinished = tmp_path / "source"  # the same sweep, planned with a seed 1 it has not run yet
    shutil.copytree(source, unfinished)
    grid = json.loads((unfinished / "grid.json").read_text())
    (unfinished / "grid.json").write_text(json.dumps({**grid, "seeds": [0, 1]}))
    grid_file = write_grid(tmp_path / "other.yaml", {**micro_grid(
        name="other", steps=2, design="one_at_a_time", reuse_runs_from=str(unfinished), seeds=2,
        axes={"projector": ["linear"], "fusion": ["prefix"]})})
    assert main(["ablate", str(grid_file), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"base/seed_1: to copy from \S+ once it finishes there", printed)
    assert re.search(r"base/seed_0: to copy from \S+\n", printed)  # finished there: copied now
    calls = []
    outcome = run_ablation(AblationGrid.load(grid_file), tmp_path / "out", runner=counting_runner(calls))
    assert sorted(calls) == ["fusion=prefix/seed_0", "fusion=prefix/seed_1"]
    assert sorted(outcome.reused) == ["base/seed_0", "projector=linear/seed_0"]
    assert not (tmp_path / "out" / "base" / "seed_1").exists()  # the source sweep trains it
    assert "has not finished yet: run this sweep again once it has" in caplog.text


def test_a_partial_attempt_is_replaced_by_the_finished_twin(source, tmp_path):
    partial = tmp_path / "base" / "seed_0"
    (partial / "checkpoints" / "step_000001").mkdir(parents=True)
    (partial / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    run_ablation(one_at_a_time(source, SHARED_AXES), tmp_path)
    assert not (partial / "checkpoints").exists() and (partial / "eval.json").is_file()
    assert (partial / "metrics.jsonl").read_text() == (source / "projector=pixel_shuffle" / "seed_0" / "metrics.jsonl").read_text()
    assert not list(tmp_path.glob("base/.reuse.*"))  # no staging copy left behind


def test_another_evaluation_budget_reuses_nothing(source, tmp_path, caplog):
    calls = []
    outcome = run_ablation(one_at_a_time(source, SHARED_AXES, eval_limit=8), tmp_path, runner=counting_runner(calls))
    assert outcome.reused == [] and sorted(calls) == ["base/seed_0", "projector=linear/seed_0"]
    assert "evaluated eval_limit=4 test samples, this grid 8; nothing reused" in caplog.text


def test_a_directory_without_a_sweep_is_refused_naming_what_was_expected(tmp_path):
    with pytest.raises(GridError, match=r"holds no ablation sweep \(no grid.json\); expected the --out directory"):
        run_ablation(one_at_a_time(tmp_path / "nothing"), tmp_path / "out")


def test_the_path_in_a_grid_file_is_read_beside_the_file(tmp_path, monkeypatch):
    (tmp_path / "grids").mkdir()
    path = write_grid(tmp_path / "grids" / "g.yaml", micro_grid(reuse_runs_from="results/base"))
    monkeypatch.chdir(tmp_path)
    assert AblationGrid.load("grids/g.yaml").reuse_runs_from == "grids/results/base"
    assert AblationGrid.load(path).reuse_runs_from == str(tmp_path / "grids" / "results" / "base")


def test_a_sweep_cannot_copy_from_its_own_output_directory(source, tmp_path):
    own = tmp_path / "own"
    shutil.copytree(source, own)
    before = (own / "grid.json").read_text()
    with pytest.raises(GridError, match="is this sweep's own output directory"):
        run_ablation(one_at_a_time(own, SHARED_AXES), own)
    assert (own / "grid.json").read_text() == before  # refused before anything was written
