"""easy-VQA: the official split, exact counts, derived question types, grouping and caching."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from minivlm.data.easy_vqa import EasyVQA, default_data_dir, question_type_of


@pytest.fixture(scope="module")
def train():
    return EasyVQA("train")


@pytest.fixture(scope="module")
def test_split():
    return EasyVQA("test")


def test_official_split_sizes_and_answers(train, test_split):
    assert len(train) == 38_575 and len(test_split) == 9_673
    assert len(train.image_ids()) == 4_000 and len(test_split.image_ids()) == 1_000
    assert len(train.answers) == 13 and set(train.answers) == set(test_split.answers)
    assert {q.answer for q in train.questions} == set(train.answers)


def test_yes_no_counts_match_the_dataset_readme(train, test_split):
    # easy_vqa/data/README.md: 28,407 train and 7,136 test questions are yes/no.
    assert Counter(q.question_type for q in train.questions)["yes_no"] == 28_407
    assert Counter(q.question_type for q in test_split.questions)["yes_no"] == 7_136


def test_question_types_follow_the_answer_sets(train):
    assert question_type_of("triangle") == "shape"
    assert question_type_of("no") == "yes_no"
    assert question_type_of("teal") == "color"
    by_type = {}
    for record in train.questions:
        by_type.setdefault(record.question_type, set()).add(record.answer)
    assert by_type == {
        "shape": {"circle", "rectangle", "triangle"},
        "yes_no": {"yes", "no"},
        "color": {"red", "green", "blue", "yellow", "teal", "gray", "black", "brown"},
    }
    # The question wording agrees: shape questions ask "what shape"/"what is the <colour> shape".
    for record in train.questions[:2000]:
        if record.question_type == "color":
            assert "color" in record.question


def test_sample_format(test_split):
    sample = test_split[0]
    raw = json.loads((default_data_dir() / "test" / "questions.json").read_text())[0]
    user, assistant = sample["messages"]
    image = user["content"][0]["image"]
    assert image.mode == "RGB" and image.size == (64, 64)
    assert user["content"][1] == {"type": "text", "text": raw[0]}
    assert assistant["content"] == [{"type": "text", "text": raw[1]}]
    assert sample["answer"] == raw[1] and sample["image_id"] == raw[2]
    assert sample["id"] == "easy_vqa/test/0" and sample["task"] == "easy_vqa"
    assert sample["question_type"] == question_type_of(raw[1])
    assert test_split[-1]["id"] == f"easy_vqa/test/{len(test_split) - 1}"


def test_grouping_by_image_returns_all_questions_of_one_image():
    grouped = EasyVQA("test", group_by_image=True)
    assert len(grouped) == 1_000
    group = grouped[3]
    image_id = grouped.image_ids()[3]
    assert [s["id"] for s in group] == [
        f"easy_vqa/test/{i}" for i in grouped.question_indices(image_id)
    ]
    assert all(s["image_id"] == image_id for s in group)
    # One decoded image, shared: a trainer encodes it once for all its questions.
    assert len({id(s["messages"][0]["content"][0]["image"]) for s in group}) == 1
    assert sum(len(grouped.question_indices(i)) for i in grouped.image_ids()) == 9_673


def test_images_are_decoded_once_and_cached(test_split):
    first = test_split.image(5)
    assert test_split.image(5) is first
    images = test_split.images()
    assert len(images) == 1_000 and images[5] is first


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        EasyVQA("validation")


def test_data_dir_can_point_at_a_copy(tmp_path):
    source = default_data_dir()
    (tmp_path / "test" / "images").mkdir(parents=True)
    (tmp_path / "answers.txt").write_text((source / "answers.txt").read_text())
    questions = json.loads((source / "test" / "questions.json").read_text())
    kept = [q for q in questions if q[2] == 0]
    (tmp_path / "test" / "questions.json").write_text(json.dumps(kept))
    (tmp_path / "test" / "images" / "0.png").write_bytes(
        (source / "test" / "images" / "0.png").read_bytes()
    )
    copy = EasyVQA("test", data_dir=tmp_path)
    assert len(copy) == len(kept) and copy.image_ids() == [0]
    assert copy[0]["answer"] == kept[0][1]


def test_dialogues_ask_every_question_of_one_image_once():
    from minivlm.data.easy_vqa import EasyVQA, EasyVQADialogues

    base = EasyVQA("test")
    dialogues = EasyVQADialogues("test", seed=3)
    assert len(dialogues) == 1_000
    sample = dialogues[5]
    image_id = base.image_ids()[5]
    users = [m for m in sample["messages"] if m["role"] == "user"]
    answers = [m["content"][0]["text"] for m in sample["messages"] if m["role"] == "assistant"]
    images = [item for m in users for item in m["content"] if item["type"] == "image"]
    assert len(images) == 1 and images[0]["image"].tobytes() == base.image(image_id).tobytes()  # shown once
    asked = sorted((m["content"][-1]["text"], a) for m, a in zip(users, answers))
    expected = sorted((base.questions[i].question, base.questions[i].answer) for i in base.question_indices(image_id))
    assert asked == expected
    assert dialogues[5] == EasyVQADialogues("test", seed=3)[5]  # deterministic order per seed


def test_question_type_filter_keeps_official_ids(train):
    open_questions = EasyVQA("train", question_types=("shape", "color"))
    assert len(open_questions) == sum(q.question_type in ("shape", "color") for q in train.questions) == 10_168
    assert {q.question_type for q in open_questions.questions} == {"shape", "color"}
    first = open_questions[0]
    official = int(first["id"].rsplit("/", 1)[1])
    assert train[official]["messages"][0]["content"][1] == first["messages"][0]["content"][1]
    assert train[official]["answer"] == first["answer"]


@pytest.mark.parametrize("bad", [(), ("colour",), ("shape", "size")])
def test_question_type_filter_refuses_unknown_types(bad):
    with pytest.raises(ValueError, match="question_types"):
        EasyVQA("test", question_types=bad)


def test_registered_training_views():
    from minivlm.data import build_dataset

    grouped = build_dataset("easy_vqa_grouped", "train")
    assert len(grouped) == 4_000 and all(len({s["image_id"] for s in grouped[i]}) == 1 for i in (0, 1999))
    shapes = build_dataset("easy_vqa_shape", "test")
    assert len(shapes) == sum(q.question_type == "shape" for q in EasyVQA("test").questions)
    assert {shapes[i]["question_type"] for i in range(0, len(shapes), 97)} == {"shape"}
    colours = build_dataset("easy_vqa_color", "test")
    assert len(colours) == sum(q.question_type == "color" for q in EasyVQA("test").questions)
    assert {colours[i]["question_type"] for i in range(0, len(colours), 97)} == {"color"}
