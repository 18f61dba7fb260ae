"""Chat JSONL and LLaVA JSON: good records load lazily; every kind of bad record is skipped,
counted and reported with its file and line, or raised with ``strict=True``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from minivlm.data.jsonl import (
    ChatJsonlDataset,
    LlavaJsonDataset,
    iter_json_array,
    llava_to_messages,
)
from minivlm.data.sample import DataError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A dataset folder with two small images, and one image outside it (tmp_path/outside.png)."""
    folder = tmp_path / "dataset"
    (folder / "imgs").mkdir(parents=True)
    Image.new("RGB", (8, 6), (255, 0, 0)).save(folder / "imgs" / "red.png")
    Image.new("RGB", (8, 6), (0, 0, 255)).save(folder / "imgs" / "blue.png")
    Image.new("RGB", (8, 6), (0, 255, 0)).save(tmp_path / "outside.png")
    return folder


def chat(
    image: str | None = "imgs/red.png",
    question: str = "What colour is it?",
    answer: str | None = "red",
) -> dict:
    user = ([{"type": "image", "image": image}] if image is not None else []) + [
        {"type": "text", "text": question}
    ]
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return {"messages": messages}


def write_jsonl(path: Path, lines: list) -> Path:
    """Write records (dicts are JSON-encoded, bytes/str written as they are), one per line."""
    with open(path, "wb") as file:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            file.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --- good records ---------------------------------------------------------------------------


def test_records_load_as_samples_with_images_relative_to_the_file(root):
    path = write_jsonl(
        root / "train.jsonl",
        [chat(), {**chat("imgs/blue.png", answer="blue"), "id": "b", "question_type": "color"}],
    )
    dataset = ChatJsonlDataset(path)
    assert len(dataset) == 2 and not dataset.skipped
    first, second = dataset[0], dataset[1]
    image = first["messages"][0]["content"][0]["image"]
    assert (
        isinstance(image, Image.Image)
        and image.mode == "RGB"
        and image.getpixel((0, 0)) == (255, 0, 0)
    )
    assert first["messages"][0]["content"][1] == {"type": "text", "text": "What colour is it?"}
    assert first["answer"] == "red" and first["task"] == "jsonl" and first["id"] == "train/1"
    assert second["id"] == "b" and second["question_type"] == "color" and second["answer"] == "blue"


def test_string_content_system_turn_and_blank_lines(root):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi"},
        ]
    }
    dataset = ChatJsonlDataset(write_jsonl(root / "t.jsonl", ["", record, "   "]))
    sample = dataset[0]
    assert [m["content"] for m in sample["messages"]] == [
        [{"type": "text", "text": "Be brief."}],
        [{"type": "text", "text": "Hello"}],
        [{"type": "text", "text": "Hi"}],
    ]
    assert len(dataset) == 1 and not dataset.skipped  # blank lines are not records


def test_video_items_are_lists_of_frame_paths(root):
    record = chat(image=None)
    record["messages"][0]["content"].insert(
        0, {"type": "video", "video": ["imgs/red.png", "imgs/blue.png"]}
    )
    sample = ChatJsonlDataset(write_jsonl(root / "v.jsonl", [record]))[0]
    frames = sample["messages"][0]["content"][0]["video"]
    assert [f.getpixel((0, 0)) for f in frames] == [(255, 0, 0), (0, 0, 255)]


def test_prompts_without_answers_are_allowed_when_not_training(root):
    dataset = ChatJsonlDataset(
        write_jsonl(root / "p.jsonl", [chat(answer=None)]), require_assistant=False
    )
    assert "answer" not in dataset[0] and len(dataset[0]["messages"]) == 1


def test_paths_inside_the_root_are_fine_however_written(root):
    os.symlink(root / "imgs" / "red.png", root / "imgs" / "alias.png")
    lines = [
        chat("imgs/alias.png"),
        chat(str(root / "imgs" / "red.png")),
        chat("imgs/../imgs/red.png"),
    ]
    dataset = ChatJsonlDataset(write_jsonl(root / "ok.jsonl", lines))
    assert len(dataset) == 3 and not dataset.skipped


def test_images_are_loaded_lazily(root):
    path = write_jsonl(root / "lazy.jsonl", [chat("imgs/red.png")])
    dataset = ChatJsonlDataset(path)
    Image.new("RGB", (8, 6), (0, 0, 0)).save(root / "imgs" / "red.png")  # replaced after indexing
    assert dataset[0]["messages"][0]["content"][0]["image"].getpixel((0, 0)) == (0, 0, 0)


# --- bad records found while indexing ---------------------------------------------------------


def _record_with(**changes):
    def build(root: Path):
        record = chat()
        for where, value in changes.items():
            if where == "user_content":
                record["messages"][0]["content"] = value
            elif where == "role":
                record["messages"][0]["role"] = value
            elif where == "answer_text":
                record["messages"][1]["content"] = [{"type": "text", "text": value}]
            elif where == "image":
                record["messages"][0]["content"][0]["image"] = (
                    value(root) if callable(value) else value
                )
        return record

    return build


def _symlink_out(root: Path) -> str:
    os.symlink(root.parent / "outside.png", root / "imgs" / "escape.png")
    return "imgs/escape.png"


BAD_RECORDS = {
    "malformed_json": ("bad_json", lambda root: '{"messages": [{"role": "user"'),
    "not_utf8": ("bad_json", lambda root: b'{"messages": "\xff\xfe"}'),
    "not_an_object": ("bad_format", lambda root: "[1, 2, 3]"),
    "unknown_role": ("unknown_role", _record_with(role="robot")),
    "empty_content_list": ("empty_content", _record_with(user_content=[])),
    "blank_answer": ("empty_content", _record_with(answer_text="  ")),
    "unknown_item_type": (
        "unknown_content_type",
        _record_with(user_content=[{"type": "audio", "audio": "a.wav"}]),
    ),
    "no_assistant_turn": ("no_assistant_turn", lambda root: chat(answer=None)),
    "missing_image": ("missing_image", _record_with(image="imgs/nope.png")),
    "dot_dot_escape": ("path_escape", _record_with(image="../../etc/passwd")),
    "absolute_outside": (
        "path_escape",
        _record_with(image=lambda root: str(root.parent / "outside.png")),
    ),
    "symlink_escape": ("path_escape", _record_with(image=_symlink_out)),
    "image_not_a_string": ("bad_format", _record_with(image=7)),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_is_skipped_counted_and_reported_with_file_and_line(case, root, caplog):
    reason, build = BAD_RECORDS[case]
    path = write_jsonl(
        root / "data.jsonl", [chat(), build(root), chat("imgs/blue.png", answer="blue")]
    )
    with caplog.at_level(logging.WARNING):
        dataset = ChatJsonlDataset(path)
    assert len(dataset) == 2 and [s["answer"] for s in dataset] == [
        "red",
        "blue",
    ]  # nothing else lost
    assert dataset.skipped == {reason: 1}
    assert any(f"{path}:2" in message and reason in message for message in warnings_of(caplog))
    assert f"1 skipped ({reason}: 1)" in dataset.summary()


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_raises_in_strict_mode_naming_file_and_line(case, root):
    reason, build = BAD_RECORDS[case]
    path = write_jsonl(root / "data.jsonl", [chat(), build(root)])
    with pytest.raises(DataError, match=rf"^{path}:2: ") as raised:
        ChatJsonlDataset(path, strict=True)
    assert raised.value.reason == reason and raised.value.source == f"{path}:2"


def test_nothing_outside_the_root_is_opened(root, monkeypatch):
    opened = []
    import minivlm.data.jsonl as jsonl_module

    monkeypatch.setattr(jsonl_module, "load_image", lambda path, **kw: opened.append(path))
    dataset = ChatJsonlDataset(write_jsonl(root / "d.jsonl", [chat("../outside.png"), chat()]))
    dataset[0]
    assert opened == [(root / "imgs" / "red.png").resolve()]


def test_summary_counts_each_reason_and_is_logged_after_a_full_iteration(root, caplog):
    lines = [chat(), "{oops", chat("imgs/nope.png"), chat("imgs/nope2.png"), chat(answer=None)]
    dataset = ChatJsonlDataset(write_jsonl(root / "mixed.jsonl", lines))
    assert dataset.skipped == {"bad_json": 1, "missing_image": 2, "no_assistant_turn": 1}
    with caplog.at_level(logging.WARNING, logger="minivlm.data.jsonl"):
        assert len(list(dataset)) == 1
    assert warnings_of(caplog)[-1] == dataset.summary()
    assert (
        "1 usable records, 4 skipped (bad_json: 1, missing_image: 2, no_assistant_turn: 1)"
        in dataset.summary()
    )


def test_a_file_with_no_usable_record_is_an_error(root):
    with pytest.raises(DataError, match="no usable records"):
        ChatJsonlDataset(write_jsonl(root / "bad.jsonl", ["{", chat(answer=None)]))


def test_missing_file_is_an_error(root):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        ChatJsonlDataset(root / "nope.jsonl")


# --- bad image files, found when decoding ------------------------------------------------------


@pytest.fixture
def broken_images(root) -> dict[str, str]:
    (root / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "imgs" / "full.png")
    encoded = (root / "imgs" / "full.png").read_bytes()
    (root / "imgs" / "truncated.png").write_bytes(encoded[: len(encoded) // 2])
    return {"corrupt": "imgs/corrupt.png", "truncated": "imgs/truncated.png"}


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
def test_undecodable_image_is_replaced_by_the_next_record_and_reported(
    kind, root, broken_images, caplog
):
    path = write_jsonl(
        root / "d.jsonl", [chat(), chat(broken_images[kind]), chat("imgs/blue.png", answer="blue")]
    )
    dataset = ChatJsonlDataset(path)
    assert len(dataset) == 3  # not known to be bad until decoded
    with caplog.at_level(logging.WARNING):
        assert dataset[1]["answer"] == "blue"
        assert dataset[1]["answer"] == "blue"
    assert dataset.skipped == {"corrupt_image": 1}  # counted once, not per access
    assert sum(f"{path}:2" in m for m in warnings_of(caplog)) == 1
    assert [s["answer"] for s in dataset] == ["red", "blue"]  # iteration skips it


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
def test_undecodable_image_raises_in_strict_mode(kind, root, broken_images):
    path = write_jsonl(root / "d.jsonl", [chat(), chat(broken_images[kind])])
    dataset = ChatJsonlDataset(path, strict=True)
    with pytest.raises(DataError, match=rf"^{path}:2: .*(corrupt|truncated)") as raised:
        dataset[1]
    assert raised.value.reason == "corrupt_image"


def test_verify_images_finds_broken_files_while_indexing(root, broken_images):
    path = write_jsonl(
        root / "d.jsonl", [chat(), chat(broken_images["corrupt"]), chat(broken_images["truncated"])]
    )
    dataset = ChatJsonlDataset(path, verify_images=True)
    assert len(dataset) == 1 and dataset.skipped == {"corrupt_image": 2}
    with pytest.raises(DataError, match=f"{path}:2"):
        ChatJsonlDataset(path, verify_images=True, strict=True)


def test_images_over_max_pixels_are_refused(root):
    dataset = ChatJsonlDataset(write_jsonl(root / "d.jsonl", [chat()]), max_pixels=10, strict=True)
    with pytest.raises(DataError, match="max_pixels"):
        dataset[0]


# --- LLaVA JSON ---------------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<image>\nQ", ["image", "Q"]),
        ("Q\n<image>", ["Q", "image"]),
        ("left <image> right", ["left ", "image", " right"]),
        ("<image>", ["image"]),
    ],
)
def test_placeholder_becomes_an_image_item_at_its_position(value, expected):
    (user, _) = llava_to_messages(
        [{"from": "human", "value": value}, {"from": "gpt", "value": "A"}], ["x.png"]
    )
    assert [item.get("text", item["type"]) for item in user["content"]] == expected


def test_one_image_without_placeholder_goes_before_the_first_question():
    messages = llava_to_messages(
        [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], ["x.png"]
    )
    assert messages[0]["content"] == [
        {"type": "image", "image": "x.png"},
        {"type": "text", "text": "Q"},
    ]


def test_several_images_fill_placeholders_in_order():
    turns = [{"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "A"}]
    content = llava_to_messages(turns, ["a.png", "b.png"])[0]["content"]
    assert [item.get("image", item.get("text")) for item in content] == ["a.png", " vs ", "b.png"]


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
    assert [s["answer"] for s in dataset] == ["red", "blue"]
    assert dataset.skipped == {
        "image_count_mismatch": 1,
        "unknown_role": 1,
        "path_escape": 1,
        "empty_content": 1,
    }
    for line in starts[1:5]:
        assert any(f"{path}:{line}:" in m for m in warnings_of(caplog)), line
    with pytest.raises(DataError, match=f"{path}:{starts[1]}: .*placeholders"):
        LlavaJsonDataset(path, strict=True)


def test_llava_image_folder_is_the_root(root, tmp_path):
    path = write_llava(tmp_path / "llava.json", [llava(image="red.png")])
    assert LlavaJsonDataset(path, image_folder=root / "imgs")[0]["answer"] == "red"
    with pytest.raises(DataError, match="outside the dataset root"):
        LlavaJsonDataset(
            write_llava(tmp_path / "l2.json", [llava(image="../outside.png")]),
            image_folder=root,
            strict=True,
        )


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


json_values = st.recursive(
    st.none() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2)
    ),
    max_leaves=5,
)


@settings(max_examples=30, deadline=None)
@given(
    elements=st.lists(json_values, max_size=6),
    indents=st.lists(st.sampled_from([None, 0, 2]), min_size=6, max_size=6),
    blank_lines=st.lists(st.integers(0, 2), min_size=7, max_size=7),
)
def test_iter_json_array_yields_each_element_with_its_start_line(elements, indents, blank_lines):
    text, expected_lines = "[", []
    for i, element in enumerate(elements):
        text += "\n" * blank_lines[i] + " "
        expected_lines.append(text.count("\n") + 1)
        text += json.dumps(element, indent=indents[i]) + ("," if i < len(elements) - 1 else "")
    text += "\n" * blank_lines[-1] + "]\n"
    parsed = list(iter_json_array(text, "f.json"))
    assert [value for _, value in parsed] == elements
    assert [line for line, _ in parsed] == expected_lines
