"""Parquet files and Hugging Face datasets: rows become chat samples by the column conventions
of HF's VLM datasets, counted from metadata, read by row group; exact positions."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import datakit as sk

from minivlm.data import build_dataset
from minivlm.data.parquet_source import ParquetSource, hf_source
from minivlm.data.sample import DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def chat_row(i: int) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"q{i}"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": f"a{i}"}]}],
            "images": [{"bytes": sk.png(sk.COLORS[i % 4]), "path": None}]}


def test_rows_of_every_file_and_row_group_are_numbered_in_order(tmp_path):
    for f in range(2):
        pq.write_table(pa.Table.from_pylist([chat_row(f * 10 + i) for i in range(7)]), tmp_path / f"t{f}.parquet",
                       row_group_size=3)
    source = ParquetSource(str(tmp_path))
    assert len(source) == 14 and [s.size for s in source.shards] == [7, 7]
    assert [source[p]["answer"] for p in (13, 0, 5, 6, 7, 8)] == ["a16", "a0", "a5", "a6", "a10", "a11"]
    content = source[1]["messages"][0]["content"]
    assert content[0]["image"].getpixel((0, 0)) == (0, 0, 255) and content[1]["text"] == "q1"


@pytest.mark.parametrize("row, answer", [
    ({"conversations": json.dumps([{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]),
      "image": {"bytes": sk.png(), "path": None}}, "x"),
    ({"texts": [{"user": "Q1", "assistant": "A1"}, {"user": "Q2", "assistant": "A2"}],
      "images": [{"bytes": sk.png(), "path": None}]}, "A2"),
    ({"caption": "a red square", "image": sk.png()}, "a red square"),
])
def test_column_conventions(tmp_path, row, answer):
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "one.parquet")
    sample = build_dataset(f"parquet:{tmp_path / 'one.parquet'}")[0]
    assert sample["answer"] == answer
    assert sample["messages"][0]["content"][0]["image"].size == (8, 8)


def test_bad_rows_are_skipped_and_paths_are_refused(tmp_path):
    rows = [{"caption": "ok", "image": {"bytes": sk.png(), "path": None}},
            {"caption": "path only", "image": {"bytes": None, "path": "/etc/passwd"}},
            {"caption": "no image", "image": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    source = ParquetSource(str(tmp_path / "bad.parquet"))
    assert [source[p]["answer"] for p in range(3)] == ["ok", "ok", "ok"]
    assert source.skipped == {"bad_format": 2}
    (tmp_path / "junk.parquet").write_bytes(b"nope")
    with pytest.raises(DataError, match="not a readable parquet file"):
        ParquetSource(str(tmp_path / "junk.parquet"))


def test_hugging_face_datasets_saved_to_disk_or_as_parquet(tmp_path):
    import datasets

    rows = [{"caption": f"c{i}", "image": {"bytes": sk.png(), "path": None}} for i in range(5)]
    dataset = datasets.Dataset.from_list(rows)
    dataset.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files" / "data").mkdir(parents=True)
    dataset.to_parquet(str(tmp_path / "files" / "data" / "train-00000-of-00001.parquet"))
    saved = build_dataset(f"hf:{tmp_path / 'saved'}")
    assert len(saved) == 5 and saved[4]["answer"] == "c4"
    assert build_dataset(f"hf:{tmp_path / 'files'}?split=train")[2]["answer"] == "c2"
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"has splits \['test'\], not 'train'"):
        hf_source(str(tmp_path / "dict"))
