"""Ablation runner: grid files, variant expansion, a real 2-variant sweep through the CLI, skipping
finished runs, resuming an interrupted run, recording failures, and the reports."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
from pathlib import Path

import pytest
import yaml

from minivlm import ablate
from minivlm.ablate import AblationGrid, GridError, Variant, plan_runs, run_ablation, write_report
from minivlm.cli import main
from minivlm.provenance import source_commit
from minivlm.registry import image_tokens

#: A model and data small enough that one run (train + eval) takes a few seconds on 2 cores: 48 px
#: images (the smallest the shape scenes render) in 12 px patches (16 patches; pixel shuffle -> 4
#: image tokens), one layer each.
MICRO = {
    "encoder.image_size": 48, "encoder.patch_size": 12, "encoder.width": 32, "encoder.depth": 1,
    "encoder.n_heads": 2, "encoder.mlp_dim": 64, "encoder.stem": "patch",
    "decoder.width": 32, "decoder.n_layers": 1, "decoder.n_heads": 2, "decoder.n_kv_heads": 1,
    "decoder.mlp_dim": 64, "decoder.vocab_size": 400, "decoder.max_seq_len": 128, "data.max_length": 96,
    "train.batch_size": 4, "train.warmup_steps": 1, "train.log_every": 1, "train.save_every": 2,
    "train.precision": "fp32",
}


def micro_grid(**changes) -> dict:
    grid = {"name": "micro", "base": "tiny", "data": "shapes", "steps": 4, "eval_limit": 4, "seeds": 1,
            "overrides": dict(MICRO), "axes": {"projector": ["linear", "pixel_shuffle"]}}
    grid.update(changes)
    return grid


def write_grid(path, grid: dict):
    path.write_text(yaml.safe_dump(grid, sort_keys=False) if path.suffix == ".yaml" else json.dumps(grid))
    return path


# ---- grid files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_grid_files_load_from_yaml_and_json(tmp_path, suffix):
    grid = AblationGrid.load(write_grid(tmp_path / f"g{suffix}", micro_grid(seeds=[3, 7])))
    assert grid.name == "micro" and grid.steps == 4 and grid.seeds == (3, 7)
    assert "encoder.width=32" in grid.overrides
    assert grid.axes == {"projector": ("linear", "pixel_shuffle")}


def test_grid_name_defaults_to_the_file_name(tmp_path):
    raw = micro_grid()
    del raw["name"]
    assert AblationGrid.load(write_grid(tmp_path / "my_sweep.yaml", raw)).name == "my_sweep"


def test_variants_are_the_product_of_the_axes_first_axis_slowest():
    grid = AblationGrid.from_dict(micro_grid(axes={"projector": ["linear", "mlp"], "fusion": ["splice", "prefix"],
                                                   "encoder.feature_layer": [-1]}))
    names = [v.name for v in grid.variants()]
    assert names == [
        "projector=linear__fusion=splice__encoder.feature_layer=-1",
        "projector=linear__fusion=prefix__encoder.feature_layer=-1",
        "projector=mlp__fusion=splice__encoder.feature_layer=-1",
        "projector=mlp__fusion=prefix__encoder.feature_layer=-1",
    ]
    cfg = grid.variant_config(grid.variants()[3], seed=5)
    assert (cfg.projector.kind, cfg.fusion.kind, cfg.encoder.feature_layer) == ("mlp", "prefix", -1)
    assert (cfg.train.seed, cfg.train.steps, cfg.encoder.width, cfg.data.mixture) == (5, 4, 32, "shapes")


def test_a_grid_without_axes_is_one_base_variant():
    grid = AblationGrid.from_dict(micro_grid(axes=None))
    assert [v.name for v in grid.variants()] == ["base"]


def test_command_line_axes_seeds_and_budget_replace_the_files():
    grid = AblationGrid.from_dict(micro_grid()).with_axes(["projector=mlp", "data.resize=resize,letterbox"])
    grid = grid.with_seeds(3).with_budget(steps=9, eval_limit=2)
    assert grid.axes == {"projector": ("mlp",), "data.resize": ("resize", "letterbox")}
    assert (grid.seeds, grid.steps, grid.eval_limit) == ((0, 1, 2), 9, 2)


def test_variant_names_are_directory_safe():
    assert Variant((("train.lr_scale", {"encoder": 0.1}),)).name == "train.lr_scale=__encoder___0.1_"
    assert "/" not in Variant((("data.mixture", "jsonl:/data/a.jsonl"),)).name


def test_variant_labels_say_which_axis_moved_when_one_did():
    # One-at-a-time grids: "1" alone would not say it is encoder.temporal_patch_size.
    assert Variant((("encoder.temporal_patch_size", 1),)).label == "temporal_patch_size=1"
    assert Variant((("train.lr_scale", {"encoder": 0}),)).label == 'lr_scale={"encoder": 0}'
    assert Variant((("projector", "mlp"), ("fusion", "splice"))).label == "mlp / splice"  # a product grid's point
    assert Variant(()).label == "base"


@pytest.mark.parametrize("change, message", [
    ({"epochs": 3}, r"unknown key\(s\) \['epochs'\]"),
    ({"tokens": 1000}, "give one budget, steps .* or tokens"),
    ({"steps": 0}, "steps must be a positive integer, got 0"),
    ({"seeds": 0}, "seeds must be a count >= 1"),
    ({"seeds": [1, 1]}, "seeds repeat a value"),
    ({"base": "huge"}, "unknown preset 'huge'"),
    ({"axes": {"projector": []}}, "axis 'projector' must be a non-empty list"),
    ({"axes": {"projector": ["mlp", "mlp"]}}, "axis 'projector' repeats a value"),
    ({"axes": {"decoder.n_layerz": [1, 2]}}, r"axis 'decoder.n_layerz'.*no field 'n_layerz'"),
    ({"axes": {"encoder.depth": ["deep"]}}, r"axis 'encoder.depth'.*expected int, got 'deep'"),
    ({"overrides": "train.lr=1"}, "overrides must be a mapping"),
])
def test_bad_grids_are_refused_naming_the_key(change, message):
    with pytest.raises(GridError, match=message):
        AblationGrid.from_dict(micro_grid(**change))


def test_bad_grid_files_and_cli_axes_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AblationGrid.load(tmp_path / "missing.yaml")
    (tmp_path / "grid.toml").write_text("name = 'x'")
    with pytest.raises(GridError, match=r"expected a \.yaml, \.yml or \.json grid file"):
        AblationGrid.load(tmp_path / "grid.toml")
    (tmp_path / "bad.yaml").write_text("axes: [unclosed")
    with pytest.raises(GridError, match="not valid YAML"):
        AblationGrid.load(tmp_path / "bad.yaml")
    with pytest.raises(GridError, match="expected key=value1,value2"):
        AblationGrid.from_dict(micro_grid()).with_axes(["projector"])


# ---- budgets ---------------------------------------------------------------------------------------


def test_a_token_budget_gives_variants_with_fewer_image_tokens_more_steps(tmp_path):
    grid = AblationGrid.from_dict(micro_grid(steps=None, tokens=20_000))
    plans = {p.variant.settings[0][1]: p for p in plan_runs(grid, tmp_path)}
    linear, shuffle = plans["linear"].config, plans["pixel_shuffle"].config
    assert image_tokens(linear) == 16 and image_tokens(shuffle) == 4
    assert 1 <= linear.train.steps < shuffle.train.steps
    per_step = ablate.estimate_tokens_per_step(linear)
    assert linear.train.steps == round(20_000 / per_step)


# ---- a real sweep ----------------------------------------------------------------------------------


def test_sweep_writes_tables_and_plots_and_a_rerun_skips_finished_runs(tmp_path, capsys):
    grid_file = write_grid(tmp_path / "micro.yaml", micro_grid())
    out = tmp_path / "out"
    assert main(["ablate", str(grid_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ran 2, skipped 0 finished, 0 failed" in printed
    for name in ("results.csv", "runs.csv", "results.md", "loss_curves.png", "metrics.png", "grid.json"):
        assert (out / name).is_file(), name
    for name in ("loss_curves.png", "metrics.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    rows = {r["variant"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"projector=linear", "projector=pixel_shuffle"}
    linear, shuffle = rows["projector=linear"], rows["projector=pixel_shuffle"]
    assert (linear["image_tokens"], shuffle["image_tokens"]) == ("16", "4")
    assert int(linear["params"]) > 0 and int(linear["flops_per_sample"]) > int(shuffle["flops_per_sample"])
    for row in (linear, shuffle):
        assert row["finished_seeds"] == "1"
        assert float(row["final_train_loss_mean"]) > 0 and float(row["eval_loss_mean"]) > 0
        assert float(row["tokens_per_s_mean"]) > 0
        assert 0 <= float(row["shapes/accuracy_mean"]) <= 1

    run_dir = out / "projector=linear" / "seed_0"
    assert (run_dir / "eval.json").is_file() and (run_dir / "model" / "model.safetensors").is_file()
    assert not (run_dir / "checkpoints").exists()  # pruned once finished
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["wall_seconds"] > 0 and ("CPU" in info["machine"] or "GPU" in info["machine"])
    assert info["code"] == source_commit()  # the code that trained it (None outside a git checkout)
    if "CPU" in info["machine"]:  # the threads the run trained with, as its log says
        threads = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["threads"]
        assert f"{threads} torch thread" in info["machine"]
    md = (out / "results.md").read_text()
    assert re.search(r"- runs finished \d{4}-\d\d-\d\d on .*; \d+ min of training and evaluation for 2 runs", md)
    assert "| projector | params | GFLOP/sample | image tokens |" in md
    assert "| linear |" in md and "| pixel_shuffle |" in md and "shapes/accuracy" in md

    stamp = (run_dir / "eval.json").stat().st_mtime_ns
    (run_dir / "eval_loss.json").unlink()  # as if stopped between the evaluation and the eval loss
    assert main(["ablate", str(grid_file), "--out", str(out)]) == 0
    assert "ran 0, skipped 2 finished, 0 failed" in capsys.readouterr().out
    assert (run_dir / "eval.json").stat().st_mtime_ns == stamp
    assert (run_dir / "eval_loss.json").is_file()

    assert main(["ablate", str(grid_file), "--out", str(out), "--steps", "5"]) == 2
    assert "holds runs of grid 'micro' made with other settings (steps: 4 -> 5)" in capsys.readouterr().err


def test_a_base_config_changed_between_invocations_is_refused(tmp_path):
    grid = AblationGrid.from_dict(micro_grid(axes={"projector": ["nonexistent"]}))
    run_ablation(grid, tmp_path)  # the invalid variant fails at once; the settings are recorded
    recorded = json.loads((tmp_path / "base_config.json").read_text())
    recorded["encoder"]["width"] = 48  # as if the preset had been edited since
    (tmp_path / "base_config.json").write_text(json.dumps(recorded))
    with pytest.raises(GridError, match=r"encoder.width: 48 -> 32"):
        run_ablation(grid, tmp_path)


@pytest.mark.parametrize("name", ["projectors", "encoder_and_training"])
def test_the_committed_studies_still_resume_from_their_grid_files(name):
    # The README's commands re-run a committed study on any clone and skip its finished runs; that
    # holds only while the grid file still resolves to the settings the runs were made with (an edit
    # of the `tiny` preset must not leave the committed results unreachable or silently mixed).
    grid_dir = Path(__file__).resolve().parents[2] / "benchmarks" / "ablations"
    grid = AblationGrid.load(grid_dir / f"{name}.yaml")
    ablate.check_output_dir(grid, grid_dir / "results" / name)
    assert grid.base_config().train.precision == "fp32"  # what `auto` gave on the CPU that made them


def test_a_wall_clock_limit_never_cuts_a_variant_short():
    grid = AblationGrid.from_dict(micro_grid(overrides={**MICRO, "train.max_minutes": 0.5}))
    assert grid.variant_config(grid.variants()[0], seed=0).train.max_minutes is None


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    grid = AblationGrid.from_dict(micro_grid(axes={"projector": ["pixel_shuffle"]},
                                             overrides={**MICRO, "train.eval_every": 2}))

    def send_sigterm(cfg):
        def evaluate(model):
            os.kill(os.getpid(), signal.SIGTERM)
            return {"probe": 0.0}
        return evaluate

    monkeypatch.setattr("minivlm.train.recipe.periodic_eval", send_sigterm)
    first = run_ablation(grid, tmp_path)
    run_dir = tmp_path / "projector=pixel_shuffle" / "seed_0"
    assert first.interrupted and first.ran == []
    assert not (run_dir / "eval.json").exists()
    assert (run_dir / "checkpoints" / "step_000002").is_dir()

    monkeypatch.setattr("minivlm.train.recipe.periodic_eval", lambda cfg: lambda model: {"probe": 0.0})
    second = run_ablation(grid, tmp_path)
    assert not second.interrupted and second.ran == ["projector=pixel_shuffle/seed_0"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # resumed at 3, nothing repeated


def test_a_run_interrupted_before_its_first_log_record_stops_the_sweep(tmp_path, monkeypatch):
    """Seen on a real sweep: SIGINT during a run's first step (no metrics.jsonl yet) was recorded
    as a failure (drawing loss.png needed the log) and the sweep went on to the next run."""
    grid = AblationGrid.from_dict(micro_grid(overrides={**MICRO, "train.log_every": 10}))
    from minivlm.train import step as step_module

    real, calls = step_module.lr_multiplier, []

    def interrupt_the_first_step(*args):
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(step_module, "lr_multiplier", interrupt_the_first_step)
    outcome = run_ablation(grid, tmp_path)
    run_dir = tmp_path / "projector=pixel_shuffle" / "seed_0"
    assert outcome.interrupted and outcome.failed == {} and outcome.ran == []
    assert not (run_dir / "error.json").exists() and (run_dir / "checkpoints" / "step_000001").is_dir()
    assert not (tmp_path / "projector=linear").exists()  # the sweep stopped there


def test_a_failing_variant_is_recorded_and_the_sweep_goes_on(tmp_path):
    # shuffle factor 3 does not divide the 4x4 patch grid: that variant's config is invalid.
    grid = AblationGrid.from_dict(micro_grid(axes={"projector": ["pixel_shuffle"], "projector.shuffle_factor": [3, 2]}))
    from minivlm.train.recipe import run as recipe_run

    calls = []

    def runner(cfg, run_dir, **kw):
        calls.append(cfg.projector.shuffle_factor)
        return recipe_run(cfg, run_dir, **kw)

    outcome = run_ablation(grid, tmp_path, runner=runner)
    bad = "projector=pixel_shuffle__projector.shuffle_factor=3"
    good = "projector=pixel_shuffle__projector.shuffle_factor=2"
    assert calls == [2]
    assert outcome.ran == [f"{good}/seed_0"]
    assert "does not divide the 4x4 patch grid" in outcome.failed[f"{bad}/seed_0"]
    md = (tmp_path / "results.md").read_text()
    assert "Failed runs:" in md and "does not divide" in md
    assert json.loads((tmp_path / bad / "seed_0" / "error.json").read_text())["error"].startswith("ConfigError")


def test_an_exception_inside_a_run_is_recorded_with_its_traceback(tmp_path):
    grid = AblationGrid.from_dict(micro_grid())

    def exploding(cfg, run_dir, **kw):
        raise RuntimeError(f"out of memory in {cfg.projector.kind}")

    outcome = run_ablation(grid, tmp_path, runner=exploding)
    assert set(outcome.failed.values()) == {"RuntimeError: out of memory in linear",
                                            "RuntimeError: out of memory in pixel_shuffle"}
    error = json.loads((tmp_path / "projector=linear" / "seed_0" / "error.json").read_text())
    assert "Traceback" in error["traceback"]
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert [r["status"] for r in rows] == ["failed", "failed"]


def test_dry_run_lists_runs_without_training(tmp_path, capsys):
    grid_file = write_grid(tmp_path / "micro.yaml", micro_grid())
    assert main(["ablate", str(grid_file), "--out", str(tmp_path / "out"), "--seeds", "2",
                 "--grid", "fusion=splice,cross_attention", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "grid micro: 4 variants x 2 seeds" in printed
    assert printed.count("to run, 4 steps") == 8
    assert not (tmp_path / "out").exists()


# ---- aggregation over seeds -----------------------------------------------------------------------


def fake_run(run_dir, accuracy: float, losses: list[float], rate: float) -> None:
    """A finished run as the recipe leaves it: metrics.jsonl and eval.json."""
    run_dir.mkdir(parents=True)
    records = [{"step": i + 1, "loss": loss, "tokens_per_s": rate} for i, loss in enumerate(losses)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "eval.json").write_text(json.dumps({"metrics": {"shapes/accuracy": accuracy, "shapes/count": 0.5},
                                                   "steps": len(losses)}))
    (run_dir / "eval_loss.json").write_text(json.dumps({"eval_loss": 2 * accuracy}))


def test_results_are_mean_std_and_standard_error_over_seeds(tmp_path):
    grid = AblationGrid.from_dict(micro_grid(seeds=2, steps=10))
    for seed, accuracy in ((0, 0.2), (1, 0.4)):
        fake_run(tmp_path / "projector=linear" / f"seed_{seed}", accuracy, [3.0] * 9 + [1.0 + seed], 100.0 + seed)
    fake_run(tmp_path / "projector=pixel_shuffle" / "seed_0", 0.9, [2.0] * 10, 50.0)
    paths = write_report(grid, tmp_path)
    rows = {r["variant"]: r for r in csv.DictReader(paths["results_csv"].open())}
    linear = rows["projector=linear"]
    assert float(linear["shapes/accuracy_mean"]) == pytest.approx(0.3)
    assert float(linear["shapes/accuracy_std"]) == pytest.approx(0.1414, abs=1e-4)
    assert float(linear["shapes/accuracy_se"]) == pytest.approx(0.1)  # std / sqrt(2 seeds)
    assert float(linear["final_train_loss_mean"]) == pytest.approx(1.5)  # the last 10% of 10 steps
    assert float(linear["tokens_per_s_mean"]) == pytest.approx(100.5)
    assert float(linear["eval_loss_mean"]) == pytest.approx(0.6)
    shuffle = rows["projector=pixel_shuffle"]
    assert (shuffle["finished_seeds"], shuffle["shapes/accuracy_std"]) == ("1", "0.0")
    md = paths["results_md"].read_text()
    assert "- runs: not recorded" in md  # these runs carry no run_info.json
    assert "| linear |" in md and "0.300 ± 0.100" in md and "| 2/2 |" in md and "| 1/2 |" in md
    assert "| 0.900 |" in md and "0.900 ± " not in md  # one finished seed: the mean alone, no error bar
    assert "mean ± standard error over seeds" in md
    assert "Per question type:" in md and "shapes/count" in md


def test_load_results_reads_a_result_directory(tmp_path):
    grid = AblationGrid.from_dict(micro_grid())
    (tmp_path / "grid.json").write_text(json.dumps(grid.to_dict()))
    fake_run(tmp_path / "projector=linear" / "seed_0", 0.5, [2.0, 1.0], 10.0)
    loaded, summaries = ablate.load_results(tmp_path)
    assert loaded == grid
    assert [len(s.finished) for s in summaries] == [1, 0]
    assert [r.status for r in summaries[1].runs] == ["pending"]
    with pytest.raises(FileNotFoundError, match="not an ablation result directory"):
        ablate.load_results(tmp_path / "projector=linear")


def test_report_only_writes_the_tables_of_the_finished_runs_and_trains_nothing(tmp_path, capsys):
    grid_file = write_grid(tmp_path / "micro.yaml", micro_grid())
    out = tmp_path / "out"
    out.mkdir()
    (out / "grid.json").write_text(json.dumps(AblationGrid.load(grid_file).to_dict()))
    fake_run(out / "projector=linear" / "seed_0", 0.625, [2.0, 1.0], 10.0)
    assert main(["ablate", str(grid_file), "--out", str(out), "--report-only"]) == 0
    md = (out / "results.md").read_text()
    assert "| linear |" in md and "0.625" in md and "| 0/1 |" in md  # pixel_shuffle: not run
    assert not (out / "projector=pixel_shuffle").exists()
    assert (out / "accuracy_vs_flops.png").stat().st_size > 0
    assert "results_md: " in capsys.readouterr().out


def test_report_only_needs_a_result_directory(tmp_path, capsys):
    grid_file = write_grid(tmp_path / "micro.yaml", micro_grid())
    assert main(["ablate", str(grid_file), "--out", str(tmp_path / "empty"), "--report-only"]) != 0
    err = capsys.readouterr().err
    assert "is not an ablation result directory (no grid.json)" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# ---- sharing a sweep between processes ------------------------------------------------------------


def test_runs_go_seed_by_seed_baseline_first_so_a_stopped_sweep_has_a_whole_table(tmp_path):
    grid = AblationGrid.from_dict(micro_grid(seeds=2, axes={"projector": ["linear", "mlp", "pixel_shuffle"]}))
    assert grid.baseline().name == "projector=pixel_shuffle"  # the preset's own projector
    assert [(p.variant.name, p.seed) for p in plan_runs(grid, tmp_path)] == [
        ("projector=pixel_shuffle", 0), ("projector=linear", 0), ("projector=mlp", 0),
        ("projector=pixel_shuffle", 1), ("projector=linear", 1), ("projector=mlp", 1)]


def test_shards_split_the_runs_without_overlap(tmp_path, capsys):
    grid_file = write_grid(tmp_path / "micro.yaml", micro_grid(seeds=3))
    listed = []
    for shard in ("0/2", "1/2"):
        assert main(["ablate", str(grid_file), "--out", str(tmp_path / "out"), "--shard", shard, "--dry-run"]) == 0
        listed.append(re.findall(r"  (\S+): to run", capsys.readouterr().out))
    assert len(listed[0]) == 3 and len(listed[1]) == 3 and not set(listed[0]) & set(listed[1])
    assert set(listed[0]) | set(listed[1]) == {f"projector={p}/seed_{s}" for p in ("linear", "pixel_shuffle")
                                               for s in range(3)}


def test_two_shards_finish_the_sweep_together(tmp_path):
    grid = AblationGrid.from_dict(micro_grid(steps=2))
    first = run_ablation(grid, tmp_path, shard=(0, 2))
    assert first.ran == ["projector=pixel_shuffle/seed_0"]  # the baseline first
    second = run_ablation(grid, tmp_path, shard=(1, 2))
    assert second.ran == ["projector=linear/seed_0"]
    assert "| 1/1 |" in second.reports["results_md"].read_text().split("| pixel_shuffle |")[1].splitlines()[0]


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "3/2", "0/0"])
def test_a_bad_shard_is_refused_in_one_line(tmp_path, capsys, text):
    grid_file = write_grid(tmp_path / "micro.yaml", micro_grid())
    assert main(["ablate", str(grid_file), "--shard", text, "--dry-run"]) != 0
    err = capsys.readouterr().err
    assert f"--shard {text!r}: expected I/N with 0 <= I < N" in err and "Traceback" not in err
