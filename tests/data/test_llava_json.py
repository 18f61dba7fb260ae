"""LLaVA JSON: records become chat samples through the conversation layer, bad records are
skipped with the line they start on, images come from a separate folder, and a broken document
always raises."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datakit
import pytest
from PIL import Image

from minivlm.data import build_dataset
from minivlm.data.llava import LlavaJsonDataset
from minivlm.data.sample import DataError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return datakit.image_folder(tmp_path)




def llava(image="imgs/red.png", human="<image>\nWhat colour is it?", gpt="red", **extra) -> dict:
    record = {
        "id": "r",
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}],
        **extra,
    }
    if image is not None:
        record["image"] = image
    return record


def write_llava(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=2))
    return path


def test_llava_records_become_chat_samples(root):
    dataset = LlavaJsonDataset(
        write_llava(root / "llava.json", [llava(), llava(image=None, human="Hi", gpt="Hello")])
    )
    first, second = dataset[0], dataset[1]
    user, assistant = first["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert user["content"][0]["type"] == "image" and user["content"][0]["image"].getpixel(
        (0, 0)
    ) == (255, 0, 0)
    assert user["content"][1] == {"type": "text", "text": "What colour is it?"}
    assert first["answer"] == "red" and first["id"] == "r" and first["task"] == "llava"
    assert second["messages"][0]["content"] == [{"type": "text", "text": "Hi"}]


def content_of(sample: dict) -> list:
    """The user turn's items: texts as strings, images as their top-left colour."""
    return [item["text"] if item["type"] == "text" else item["image"].getpixel((0, 0))
            for item in sample["messages"][0]["content"]]


RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<image>\nQ", [RED, "Q"]),
        ("Q\n<image>", ["Q", RED]),
        ("left <image> right", ["left ", RED, " right"]),
        ("<image>", [RED]),
        ("Q", [RED, "Q"]),  # one image and no placeholder: before the first question, as LLaVA
    ],
)
def test_placeholder_becomes_an_image_item_at_its_position(value, expected, root):
    dataset = LlavaJsonDataset(write_llava(root / "l.json", [llava(human=value)]))
    assert content_of(dataset[0]) == expected


def test_several_images_fill_placeholders_in_order(root):
    record = llava(image=["imgs/red.png", "imgs/blue.png"], human="<image> vs <image>")
    assert content_of(LlavaJsonDataset(write_llava(root / "l.json", [record]))[0]) == [RED, " vs ", BLUE]


def test_llava_bad_records_are_skipped_with_the_line_they_start_on(root, caplog):
    records = [
        llava(),
        llava(human="<image> <image> two?"),  # one image, two placeholders
        {"id": "x", "conversations": [{"from": "bot", "value": "?"}]},
        llava(image="../../etc/passwd"),
        llava(gpt=""),
        llava(image="imgs/blue.png", gpt="blue"),
    ]
    path = write_llava(root / "llava.json", records)
    starts = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line == "  {"]
    with caplog.at_level(logging.WARNING):
        dataset = LlavaJsonDataset(path)
        assert len(dataset) == 6 and not dataset.skipped  # lazy: found when read
        assert [s["answer"] for s in dataset] == ["red", "blue"]
    assert dataset.skipped == {
        "image_count_mismatch": 1,
        "unknown_role": 1,
        "path_escape": 1,
        "empty_content": 1,
    }
    for line in starts[1:5]:
        assert any(f"{path}:{line}:" in m for m in datakit.warnings_of(caplog)), line
    with pytest.raises(DataError, match=f"{path}:{starts[1]}: .*placeholders"):
        LlavaJsonDataset(path, strict=True)[1]
    with pytest.raises(DataError, match=f"{path}:{starts[1]}: .*placeholders"):
        LlavaJsonDataset(path, strict=True, verify=True)
    assert len(LlavaJsonDataset(path, verify=True)) == 2


def test_llava_image_folder_is_the_root(root, tmp_path):
    path = write_llava(tmp_path / "llava.json", [llava(image="red.png")])
    assert LlavaJsonDataset(path, image_folder=root / "imgs")[0]["answer"] == "red"
    with pytest.raises(DataError, match="outside the dataset root"):
        LlavaJsonDataset(
            write_llava(tmp_path / "l2.json", [llava(image="../outside.png")]),
            image_folder=root,
            strict=True,
        )[0]


def test_a_spec_names_the_image_folder(root, tmp_path):
    path = write_llava(tmp_path / "llava.json", [llava(image="red.png")])
    dataset = build_dataset(f"llava:{path}?images={root / 'imgs'}")
    assert dataset[0]["answer"] == "red" and dataset.image_root == (root / "imgs").resolve()
    with pytest.raises(ValueError, match="has no option 'imgs'; it takes: images"):
        build_dataset(f"llava:{path}?imgs={root}")


def test_a_video_record_takes_the_forms_chat_takes(root, tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue", "green")]
    frames[0].save(root / "clip.gif", save_all=True, append_images=frames[1:], duration=100)
    (root / "frames").mkdir()
    for i, frame in enumerate(frames):
        frame.save(root / "frames" / f"f{i}.png")
    records = [{"id": str(i), "video": video, "conversations": [{"from": "human", "value": "<video>\nWhere?"},
                                                                   {"from": "gpt", "value": "left"}]}
               for i, video in enumerate(["clip.gif", "frames", ["frames/f0.png", "frames/f2.png"]])]
    dataset = LlavaJsonDataset(write_llava(root / "v.json", records))
    gif, folder, listed = (dataset[i]["messages"][0]["content"][0]["video"] for i in range(3))
    assert gif == str(root / "clip.gif") and folder == str(root / "frames")  # the processor samples frames
    assert [f.getpixel((0, 0)) for f in listed] == [(255, 0, 0), (0, 128, 0)]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('[\n  {"id": 1},\n  {"id": 2\n]', 4),
        ('{"id": 1}', 1),
        ('[\n{"id": 1}\n]\n]', 4),
        ("[\n  1,\n  2,,\n]", 3),
    ],
)
def test_malformed_llava_document_always_raises_naming_the_line(root, text, line):
    path = root / "broken.json"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"^{path}:{line}: malformed JSON document"):
        LlavaJsonDataset(path)  # even without strict: the rest of the array cannot be trusted
