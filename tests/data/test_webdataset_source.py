"""webdataset tar shards: samples grouped by key become chat samples (captions, chat JSON, LLaVA
JSON), read at any position by seeking (plain tar) or skipping (gzip); bad samples are skipped."""

from __future__ import annotations

import logging

import pytest
import datakit as sk

from minivlm.data import build_dataset
from minivlm.data.sample import CAPTION_PROMPT, DataError
from minivlm.data.webdataset_source import WebDatasetSource


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_positions_number_the_records_shard_by_shard(tmp_path, mode):
    spec = sk.write_caption_shards(tmp_path, [3, 5, 2], mode)
    source = WebDatasetSource(spec)
    assert len(source) == 10 and [s.size for s in source.shards] == [3, 5, 2]
    order = [9, 0, 4, 5, 6, 3, 1]  # jumps (seek or skip) and sequential reads
    assert [source[p]["answer"] for p in order] == ["s2 r1", "s0 r0", "s1 r1", "s1 r2", "s1 r3", "s1 r0", "s0 r1"]
    sample = source[4]
    user = sample["messages"][0]["content"]
    assert user[1] == {"type": "text", "text": CAPTION_PROMPT}
    assert user[0]["image"].getpixel((0, 0)) == (0, 128, 0)  # green: COLORS[(1 + 1) % 4]
    assert sample["caption"] == "s1 r1" and sample["task"] == "webdataset"


def test_chat_and_llava_json_samples_bind_their_images(tmp_path):
    red, blue = sk.png("red"), sk.png("blue")
    chat = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image", "image": "1.png"},
                                                      {"type": "text", "text": "Same colour?"}]},
                         {"role": "assistant", "content": "no"}]}
    llava = {"conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]}
    path = sk.write_tar(tmp_path / "mixed.tar", [{"__key__": "a", "0.png": red, "1.png": blue, "json": chat},
                                                  {"__key__": "b", "jpg": red, "json": llava}])
    source = WebDatasetSource(str(path))
    first = [item.get("text") or item["image"].getpixel((0, 0)) for item in source[0]["messages"][0]["content"]]
    assert first == [(255, 0, 0), (0, 0, 255), "Same colour?"] and source[0]["answer"] == "no"
    assert source[1]["answer"] == "red" and source[1]["messages"][0]["content"][1]["text"] == "Colour?"


def test_bad_samples_are_skipped_counted_and_replaced(tmp_path, caplog):
    path = sk.write_tar(tmp_path / "bad.tar", [
        {"__key__": "ok1", "png": sk.png(), "txt": b"fine"},
        {"__key__": "nocap", "png": sk.png()},
        {"__key__": "corrupt", "png": b"\x89PNG\r\n\x1a\nnot really", "txt": b"broken"},
        {"__key__": "badjson", "png": sk.png(), "json": b"{oops"},
        {"__key__": "ok2", "png": sk.png(), "txt": b"also fine"},
    ])
    source = WebDatasetSource(str(path))
    with caplog.at_level(logging.WARNING):
        assert [source[p]["answer"] for p in range(5)] == ["fine", "also fine", "also fine", "also fine", "also fine"]
    assert source.skipped == {"bad_format": 1, "corrupt_image": 1, "bad_json": 1}
    assert any(f"{path}#1" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match=r"#1: a sample needs"):
        WebDatasetSource(str(path), strict=True)[1]


def test_specs_name_shards_by_braces_glob_or_directory(tmp_path):
    spec = sk.write_caption_shards(tmp_path / "d", [2, 2, 2])
    for name in (spec, str(tmp_path / "d" / "*.tar"), str(tmp_path / "d")):
        assert len(build_dataset(f"webdataset:{name}")) == 6
    with pytest.raises(FileNotFoundError, match="no such file"):
        WebDatasetSource(str(tmp_path / "d" / "shard-{000..009}.tar"))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match="not a readable tar shard"):
        WebDatasetSource(str(tmp_path / "junk.tar"))


def test_a_forked_worker_opens_its_own_shard(tmp_path):
    import json
    import os

    import io

    import numpy as np
    from PIL import Image

    def noise(i):  # ~30 kB each: more than the tar reader buffers ahead
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    samples = [{"__key__": f"{i:03d}", "png": noise(i), "txt": f"s0 r{i}".encode()} for i in range(6)]
    source = WebDatasetSource(str(sk.write_tar(tmp_path / "big.tar", samples)))
    assert source[0]["answer"] == "s0 r0"  # the parent holds shard 0 open, positioned at record 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a DataLoader worker, forked: reads on from the same position
        os.write(write, json.dumps([source[1]["answer"], source[2]["answer"]]).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert json.loads(os.read(read, 1000)) == ["s0 r1", "s0 r2"]
    # the parent reads on from its own file position, which the child did not move
    assert [source[i]["answer"] for i in range(1, 6)] == [f"s0 r{i}" for i in range(1, 6)]
