"""The sample format: building samples and validating decoded chat messages."""

from __future__ import annotations

import pickle

import pytest
from PIL import Image

from minivlm.data.sample import (
    DataError,
    image_item,
    last_assistant_text,
    checked_llava,
    checked_messages,
    sample_from_messages,
    video_item,
    vqa_sample,
)
from minivlm.text.chat import to_hf_messages


def test_vqa_sample_layout():
    image = Image.new("RGB", (4, 4))
    sample = vqa_sample(
        visuals=[image_item(image), video_item([image, image])],
        question="Q?",
        answer="A",
        task="t",
        sample_id="t/train/0",
        question_type="kind",
        system="Be brief.",
        scene="extra",
    )
    assert [m["role"] for m in sample["messages"]] == ["system", "user", "assistant"]
    assert [item["type"] for item in sample["messages"][1]["content"]] == ["image", "video", "text"]
    assert sample["messages"][1]["content"][1]["video"] == [image, image]
    assert sample["answer"] == "A" == last_assistant_text(sample["messages"])
    assert (sample["task"], sample["id"], sample["question_type"], sample["scene"]) == (
        "t",
        "t/train/0",
        "kind",
        "extra",
    )
    assert "question_type" not in vqa_sample(
        visuals=[], question="Q", answer="A", task="t", sample_id="x"
    )


def test_checked_messages_turn_string_content_into_text_items():
    messages = checked_messages(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "yo"}]},
        ],
        require_assistant=True,
    )
    assert to_hf_messages(messages)[0]["content"] == [{"type": "text", "text": "hi"}]


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([], "bad_format"),
        ("hello", "bad_format"),
        (["hello"], "bad_format"),
        ([{"role": "narrator", "content": "x"}], "unknown_role"),
        ([{"content": "x"}], "unknown_role"),
        ([{"role": "user", "content": 3}], "bad_format"),
        ([{"role": "user", "content": ["x"]}], "bad_format"),
        ([{"role": "user", "content": [{"type": "text", "text": None}]}], "bad_format"),
        ([{"role": "user", "content": [{"type": "image"}]}], "bad_format"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "unknown_content_type"),
        ([{"role": "user", "content": ""}], "empty_content"),
        ([{"role": "user", "content": []}], "empty_content"),
        ([{"role": "user", "content": [{"type": "text", "text": " \n"}]}], "empty_content"),
        ([{"role": "user", "content": "Q"}], "no_assistant_turn"),
        ([{"role": "assistant", "content": "A"}], "no_user_turn"),
        ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}],
         "media_not_allowed"),
    ],
)
def test_invalid_messages_raise_with_a_reason_and_source(messages, reason):
    with pytest.raises(DataError) as raised:
        checked_messages(messages, require_assistant=True, source="f.jsonl:3")
    assert raised.value.reason == reason and str(raised.value).startswith("f.jsonl:3: ")
    assert isinstance(raised.value, ValueError)


def test_media_only_turn_is_not_empty():
    messages = [{"role": "user", "content": [{"type": "image", "image": "a.png"}]}]
    assert (
        to_hf_messages(checked_messages(messages, require_assistant=False))[0]["content"][0]["image"] == "a.png"
    )


@pytest.mark.parametrize(
    ("turns", "images", "reason"),
    [
        ([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "A"}], ["a.png"],
         "image_count_mismatch"),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A"}], ["a.png", "b.png"],
         "image_count_mismatch"),
        ([{"from": "bot", "value": "Q"}], [], "unknown_role"),
        ([{"from": "human", "value": "Q"}, {"from": "gpt", "value": " "}], [], "empty_content"),
        ([{"from": "human", "value": "Q"}], [], "no_assistant_turn"),
        ([{"from": "human"}], [], "bad_format"),
    ],
)
def test_llava_records_are_checked_by_the_same_layer(turns, images, reason):
    with pytest.raises(DataError) as raised:
        checked_llava(turns, images, require_assistant=True, source="l.json:9")
    assert raised.value.reason == reason and str(raised.value).startswith("l.json:9: ")


def test_llava_role_aliases_and_sample_answer():
    messages = checked_llava([{"from": "user", "value": "<image>\nQ"}, {"from": "assistant", "value": "A"}],
                             ["a.png"], require_assistant=True)
    sample = sample_from_messages(messages, task="llava", id="x")
    assert sample["answer"] == "A" and sample["messages"][0]["content"] == [
        {"type": "image", "image": "a.png"}, {"type": "text", "text": "Q"}]


def test_data_error_survives_pickling_for_dataloader_workers():
    error = DataError("line is broken", reason="bad_json", source="f.jsonl:7")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.reason, copy.source, copy.detail) == (
        "f.jsonl:7: line is broken",
        "bad_json",
        "f.jsonl:7",
        "line is broken",
    )
    assert str(DataError("no location")) == "no location"
