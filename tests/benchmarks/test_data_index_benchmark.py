"""``benchmarks/data_index.py`` runs at a small size: it writes a LLaVA-Pretrain-shaped file that
the lazy index reads back whole, and reports time and peak memory per step."""

from __future__ import annotations

import json

from benchmarks.data_index import main, write_llava_pretrain

from minivlm.data.llava import LlavaJsonDataset


def test_the_synthetic_file_is_llava_pretrain_shaped(tmp_path):
    path = tmp_path / "l.json"
    write_llava_pretrain(path, 50)
    records = json.loads(path.read_text())
    assert len(records) == 50 and records[3]["image"] == "00000/000000003.jpg"
    assert [t["from"] for t in records[0]["conversations"]] == ["human", "gpt"]
    dataset = LlavaJsonDataset(path, image_folder=tmp_path)
    assert len(dataset) == 50 and dataset.index.lines[:2].tolist() == [2, 16]  # 14 lines a record (indent 2)


def test_the_benchmark_measures_and_judges_the_target(tmp_path, capsys):
    assert main(["--records", "300", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "data_index.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["index", "json.load", "records"] and rows[0]["records"] == 300
    assert "target (index <= 10 s and <= 1 GB peak): met" in capsys.readouterr().out
