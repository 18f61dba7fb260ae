"""build_dataset: spec strings to datasets and mixtures; every malformed spec is explained."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from minivlm.data.charts import ChartsDataset
from minivlm.data.easy_vqa import EasyVQA
from minivlm.data.jsonl import ChatJsonlDataset
from minivlm.data.mixture import Mixture
from minivlm.data.registry import available_datasets, build_dataset, parse_spec, register_dataset
from minivlm.data.shapes import ShapesDataset


def test_known_names():
    assert available_datasets() == sorted(
        ["easy_vqa", "easy_vqa_grouped", "easy_vqa_open", "easy_vqa_shape", "easy_vqa_color", "easy_vqa_dialogues",
         "shapes", "charts",
         "multi_image", "video", "retrieval", "shapes_grouped", "shapes_grouped_drawn_counts", "charts_grouped",
         "multi_image_grouped", "jsonl",
         "llava", "coco", "webdataset", "parquet", "hf"]
    )


def test_weighted_mixture_is_normalised():
    mixture = build_dataset("easy_vqa:0.5,shapes:0.3,charts:0.2", split="test", seed=1)
    assert isinstance(mixture, Mixture)
    assert mixture.names == ["easy_vqa", "shapes", "charts"]
    assert np.allclose(mixture.probabilities, [0.5, 0.3, 0.2])
    assert len(mixture) == 9_673 + 500 + 500
    assert {mixture[i]["task"] for i in range(30)} == {"easy_vqa", "shapes", "charts"}


def test_weights_need_not_sum_to_one_and_bare_names_weigh_the_same():
    assert np.allclose(build_dataset("shapes:3,charts:1", split="test").probabilities, [0.75, 0.25])
    assert np.allclose(build_dataset("shapes, charts", split="test").probabilities, [0.5, 0.5])


def test_single_source_is_the_dataset_itself_with_options_passed_on():
    dataset = build_dataset("charts", split="test", seed=3, image_size=224, length=7)
    assert isinstance(dataset, ChartsDataset) and len(dataset) == 7
    assert dataset.seed == 3 and dataset.image_size == 224 and dataset.split == "test"
    assert dataset[0]["messages"][0]["content"][0]["image"].size == (224, 224)
    assert isinstance(build_dataset("easy_vqa:2", split="test"), EasyVQA)


def test_length_of_a_fixed_dataset_is_met_by_cycling_through_it():
    dataset = build_dataset("easy_vqa", split="test", length=20_000)
    assert isinstance(dataset, Mixture) and len(dataset) == 20_000


def test_mixture_length_and_seed():
    first = build_dataset("shapes:0.5,charts:0.5", seed=7, length=100)
    second = build_dataset("shapes:0.5,charts:0.5", seed=7, length=100)
    assert len(first) == 100
    assert [first.locate(i) for i in range(100)] == [second.locate(i) for i in range(100)]


def test_file_sources_take_a_path_and_an_optional_weight(tmp_path):
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "a.png")
    record = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Q"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
        ]
    }
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert isinstance(build_dataset(f"jsonl:{path}"), ChatJsonlDataset)
    mixture = build_dataset(f"jsonl:{path}:0.2,shapes:0.8", length=50)
    assert mixture.names == [f"jsonl:{path}", "shapes"] and np.allclose(
        mixture.probabilities, [0.2, 0.8]
    )
    assert parse_spec(f"jsonl:{path}")[0].path == str(path)
    assert parse_spec("jsonl:C:/data/x.jsonl:3")[0].path == "C:/data/x.jsonl"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("shapez", "unknown dataset 'shapez'.*known datasets: charts, charts_grouped, coco, easy_vqa"),
        ("shapes:0", "> 0"),
        ("shapes:-0.5", "> 0"),
        ("shapes:nan", "finite"),
        ("shapes:inf", "finite"),
        ("shapes:lots", "positive number"),
        ("shapes:0.5,charts", "every source or to none"),
        ("shapes,shapes", "more than once"),
        ("shapes,,charts", "empty source"),
        ("", "non-empty"),
        ("jsonl", "needs a file"),
        ("jsonl:", "needs a file"),
    ],
)
def test_malformed_specs_are_explained(spec, message):
    with pytest.raises(ValueError, match=message):
        build_dataset(spec)


def test_registering_new_names():
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("shapes", lambda request: ShapesDataset())
    with pytest.raises(ValueError, match="identifiers"):
        register_dataset("my-set", lambda request: ShapesDataset())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("llava:/d/a.json?images", "KEY=VALUE pairs"),
        ("llava:/d/a.json?images=", "KEY=VALUE pairs"),
        ("llava:/d/a.json?root=/x", "has no option 'root'; it takes: images"),
        ("llava:/d/a.json?images=/x&images=/y", "given twice"),
        ("llava:?images=/x", "needs a file"),
    ],
)
def test_bad_file_options_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_options_and_weight_parse_and_the_label_round_trips():
    (source, other) = parse_spec("llava:/d/a:b.json?images=/imgs:0.25,shapes:0.75")
    assert (source.path, source.options, source.weight) == ("/d/a:b.json", (("images", "/imgs"),), 0.25)
    assert parse_spec(source.label)[0].options == source.options and other.label == "shapes"
