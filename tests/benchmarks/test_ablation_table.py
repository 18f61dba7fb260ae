"""benchmarks.ablation_table: the README's compact table, from a result directory's runs."""

from __future__ import annotations

import json

from benchmarks.ablation_table import main, table
from minivlm.ablate import AblationGrid

GRID = {"name": "micro", "base": "tiny", "steps": 4, "seeds": 2, "axes": {"projector": ["linear", "pixel_shuffle"]},
        "overrides": {"encoder.stem": "patch"}}


def finished_run(run_dir, easy_vqa: float, seconds: float) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 1.0, "tokens_per_s": 9.0,
                                                       "elapsed_s": seconds}) + "\n")
    (run_dir / "eval.json").write_text(json.dumps({"metrics": {"easy_vqa/accuracy": easy_vqa}, "steps": 4}))


def test_rows_give_mean_and_standard_error_and_bold_the_baseline(tmp_path, capsys):
    (tmp_path / "grid.json").write_text(json.dumps(AblationGrid.from_dict(GRID).to_dict()))
    finished_run(tmp_path / "projector=linear" / "seed_0", 0.5, 600.0)
    finished_run(tmp_path / "projector=linear" / "seed_1", 0.7, 720.0)
    finished_run(tmp_path / "projector=pixel_shuffle" / "seed_0", 0.9, 300.0)
    rows = {line.split(" | ")[0]: line for line in table(tmp_path).splitlines()[2:]}
    linear, shuffle = rows["| linear"], rows["| **pixel_shuffle**"]
    assert "| 0.600 ± 0.100 |" in linear and "| 11 |" in linear and linear.endswith("| 2/2 |")
    assert "| 0.900 |" in shuffle and "| 5 |" in shuffle and shuffle.endswith("| 1/2 |")  # one seed: no error bar
    assert linear.count("| - ") == 9  # the tasks these runs did not evaluate
    assert main([str(tmp_path)]) == 0 and "| **pixel_shuffle** |" in capsys.readouterr().out
