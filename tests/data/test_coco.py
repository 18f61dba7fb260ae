"""COCO captions -> one captioning chat sample per caption, images from a separate folder."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from minivlm.data import build_dataset
from minivlm.data.coco import CocoCaptionsDataset
from minivlm.data.sample import CAPTION_PROMPT, DataError


def test_each_caption_is_a_sample_with_its_image(tmp_path):
    (tmp_path / "train2017").mkdir()
    Image.new("RGB", (6, 4), "red").save(tmp_path / "train2017" / "000001.jpg")
    Image.new("RGB", (6, 4), "blue").save(tmp_path / "train2017" / "000002.jpg")
    annotations = {"images": [{"id": 1, "file_name": "000001.jpg"}, {"id": 2, "file_name": "000002.jpg"}],
                   "annotations": [{"id": 10, "image_id": 1, "caption": "A red block. "},
                                   {"id": 11, "image_id": 2, "caption": "Blue."},
                                   {"id": 12, "image_id": 7, "caption": "no such image"},
                                   {"id": 13, "image_id": 1, "caption": "Red again."}]}
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    dataset = build_dataset(f"coco:{tmp_path / 'captions.json'}?images={tmp_path / 'train2017'}")
    assert isinstance(dataset, CocoCaptionsDataset) and len(dataset) == 4
    first = dataset[0]
    assert first["answer"] == "A red block." and first["id"] == "coco/10" and first["task"] == "coco_captions"
    assert first["messages"][0]["content"][1]["text"] == CAPTION_PROMPT
    assert first["messages"][0]["content"][0]["image"].getpixel((0, 0))[2] < 50  # red (jpeg)
    assert [s["answer"] for s in dataset] == ["A red block.", "Blue.", "Red again."]
    assert dataset.skipped == {"bad_format": 1}


def test_not_a_coco_file_is_an_error(tmp_path):
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a COCO captions file"):
        CocoCaptionsDataset(tmp_path / "x.json")
