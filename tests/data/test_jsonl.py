"""Chat JSONL: good records load lazily; every kind of bad record is skipped, counted and
reported with its file and line when read (or while indexing with ``verify=True``), or raised
with ``strict=True``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import datakit
import pytest
from PIL import Image

from minivlm.data.jsonl import ChatJsonlDataset
from minivlm.data.sample import DataError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return datakit.image_folder(tmp_path)


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


# --- bad records: found when read (lazy, the default) or while indexing (verify=True) ------------


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
def test_bad_record_is_skipped_counted_and_reported_with_file_and_line_while_indexing(case, root, caplog):
    reason, build = BAD_RECORDS[case]
    path = write_jsonl(
        root / "data.jsonl", [chat(), build(root), chat("imgs/blue.png", answer="blue")]
    )
    with caplog.at_level(logging.WARNING):
        dataset = ChatJsonlDataset(path, verify=True)
    assert len(dataset) == 2 and [s["answer"] for s in dataset] == [
        "red",
        "blue",
    ]  # nothing else lost
    assert dataset.skipped == {reason: 1}
    assert any(f"{path}:2" in message and reason in message for message in datakit.warnings_of(caplog))
    assert f"1 skipped ({reason}: 1)" in dataset.summary()


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_is_skipped_counted_and_reported_when_read(case, root, caplog):
    reason, build = BAD_RECORDS[case]
    path = write_jsonl(
        root / "data.jsonl", [chat(), build(root), chat("imgs/blue.png", answer="blue")]
    )
    dataset = ChatJsonlDataset(path)
    assert len(dataset) == 3 and not dataset.skipped  # indexed, not yet read
    with caplog.at_level(logging.WARNING):
        assert dataset[1]["answer"] == "blue"  # replaced by the next loadable record
        assert [s["answer"] for s in dataset] == ["red", "blue"]  # nothing else lost
    assert dataset.skipped == {reason: 1}  # counted once, not per access
    assert sum(f"{path}:2" in message and reason in message for message in datakit.warnings_of(caplog)) == 1
    assert f"2 usable records, 1 skipped ({reason}: 1)" in dataset.summary()


@pytest.mark.parametrize("case", list(BAD_RECORDS))
@pytest.mark.parametrize("verify", [True, False])
def test_bad_record_raises_in_strict_mode_naming_file_and_line(case, verify, root):
    reason, build = BAD_RECORDS[case]
    path = write_jsonl(root / "data.jsonl", [chat(), build(root)])
    with pytest.raises(DataError, match=rf"^{path}:2: ") as raised:
        ChatJsonlDataset(path, strict=True, verify=verify)[1]
    assert raised.value.reason == reason and raised.value.source == f"{path}:2"


def test_nothing_outside_the_root_is_opened(root, monkeypatch):
    opened = []
    import minivlm.data.media as media_module

    monkeypatch.setattr(media_module, "load_image", lambda path, **kw: opened.append(path))
    dataset = ChatJsonlDataset(write_jsonl(root / "d.jsonl", [chat("../outside.png"), chat()]))
    dataset[0]
    assert opened == [(root / "imgs" / "red.png").resolve()]


@pytest.mark.parametrize("verify", [True, False])
def test_summary_counts_each_reason_and_is_logged_after_a_full_iteration(verify, root, caplog):
    lines = [chat(), "{oops", chat("imgs/nope.png"), chat("imgs/nope2.png"), chat(answer=None)]
    dataset = ChatJsonlDataset(write_jsonl(root / "mixed.jsonl", lines), verify=verify)
    with caplog.at_level(logging.WARNING, logger="minivlm.data.file_dataset"):
        assert len(list(dataset)) == 1
    assert dataset.skipped == {"bad_json": 1, "missing_image": 2, "no_assistant_turn": 1}
    assert datakit.warnings_of(caplog)[-1] == dataset.summary()
    assert (
        "1 usable records, 4 skipped (bad_json: 1, missing_image: 2, no_assistant_turn: 1)"
        in dataset.summary()
    )


def test_a_file_with_no_usable_record_is_an_error(root):
    path = write_jsonl(root / "bad.jsonl", ["{", chat(answer=None)])
    with pytest.raises(DataError, match="no usable records"):
        ChatJsonlDataset(path, verify=True)
    with pytest.raises(DataError, match=r"every record failed to load \(2 skipped"):
        ChatJsonlDataset(path)[0]
    with pytest.raises(DataError, match="no usable records"):
        ChatJsonlDataset(write_jsonl(root / "empty.jsonl", ["", "  "]))


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
    assert sum(f"{path}:2" in m for m in datakit.warnings_of(caplog)) == 1
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
    assert dataset[0]["answer"] == "red"
    with pytest.raises(DataError, match=f"{path}:2"):
        ChatJsonlDataset(path, verify_images=True, strict=True)


def test_images_over_max_pixels_are_refused(root):
    dataset = ChatJsonlDataset(write_jsonl(root / "d.jsonl", [chat()]), max_pixels=10, strict=True)
    with pytest.raises(DataError, match="max_pixels"):
        dataset[0]
