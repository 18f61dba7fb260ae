"""Grouped views of the procedural tasks: every question with one answer about one drawn scene.

The scene is the task's own (same generator, same pixels); each question the task could have asked
about it appears with the task's answer, so grouped training teaches exactly what is tested.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.data import build_dataset
from minivlm.data.charts import _extreme_gap
from minivlm.data.grouped import GroupedQuestions
from minivlm.data.video import VideoDataset

TASKS = ("shapes", "charts", "multi_image")


def question(sample):
    return sample["messages"][0]["content"][-1]["text"]


def visuals(sample):
    return [item["image"] for item in sample["messages"][0]["content"] if item["type"] == "image"]


@pytest.mark.parametrize("task", TASKS)
@settings(max_examples=40, deadline=None)
@given(index=st.integers(0, 10**6 - 1))
def test_the_group_shows_the_tasks_scene_and_contains_its_question(task, index):
    single = build_dataset(task, "train", seed=3, image_size=64)[index]
    group = build_dataset(f"{task}_grouped", "train", seed=3, image_size=64)[index]
    assert group, "every scene has at least one question with one answer"
    first = visuals(group[0])
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, visuals(single)))
    assert all(visuals(member) == first and all(x is y for x, y in zip(visuals(member), first)) for member in group)
    answers = {question(m): m["answer"] for m in group}
    assert len(answers) == len(group)  # no question twice
    if single["question_type"] != "position":  # one relation per pair, not always the one drawn for
        assert answers[question(single)] == single["answer"]
    for member in group:
        assert member["task"] == task and member["scene"] == single["scene"]
        assert member["question_type"] in (*type(build_dataset(task, "test")).QUESTION_TYPES, "table")


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, 10**6 - 1))
def test_chart_answers_follow_the_bars(index):
    group = build_dataset("charts_grouped", "train", seed=0, image_size=64)[index]
    chart = group[0]["scene"]
    by_type = {}
    for member in group:
        by_type.setdefault(member["question_type"], []).append(member)
    assert by_type["max_value"][0]["answer"] == str(max(chart.values))
    assert by_type["min_value"][0]["answer"] == str(min(chart.values))
    assert sorted(m["answer"] for m in by_type["bar_value"]) == sorted(map(str, chart.values))
    assert by_type["table"][0]["answer"] == ", ".join(f"{l} {v}" for l, v in zip(chart.labels, chart.values))
    for kind, extreme in (("tallest", max), ("shortest", min)):
        value = extreme(chart.values)
        others = sorted(chart.values)
        others.remove(value)
        clear = all(abs(value - o) >= _extreme_gap(value) for o in others)
        assert (kind in by_type) == clear
        if clear:
            assert chart.value_of(by_type[kind][0]["answer"]) == value


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, 10**6 - 1))
def test_shape_counts_and_unique_attributes_follow_the_scene(index):
    group = build_dataset("shapes_grouped", "train", seed=0, image_size=64)[index]
    scene = group[0]["scene"]
    for member in group:
        text, answer = question(member), member["answer"]
        if member["question_type"] == "count":
            kind = next(k for k in ("circle", "rectangle", "triangle") if k in text)
            assert answer == str(scene.count(kind))
        elif member["question_type"] == "color":
            (shape,) = [s for s in scene.shapes if s.kind in text]
            assert answer == shape.color
        elif member["question_type"] == "shape":
            (shape,) = [s for s in scene.shapes if f" {s.color} " in text]
            assert answer == shape.kind
    assert sum(m["question_type"] == "count" for m in group) == 3


def test_multi_image_more_names_the_one_image_with_strictly_most():
    data = build_dataset("multi_image_grouped", "train", seed=0, image_size=64)
    ordinals = ("first", "second", "third")
    for index in range(200):
        for member in data[index]:
            if member["question_type"] == "more":
                kind = question(member).split()[-1].rstrip("?")[:-1]
                counts = [scene.count(kind) for scene in member["scene"]]
                winner = ordinals.index(member["answer"].split()[1])
                assert all(counts[winner] > c for i, c in enumerate(counts) if i != winner)


def test_a_task_without_questions_about_cannot_be_grouped():
    with pytest.raises(TypeError, match="VideoDataset cannot be grouped"):
        GroupedQuestions(VideoDataset("train"))


def test_drawn_counts_keep_only_the_count_the_scene_was_drawn_for():
    """``shapes_grouped_drawn_counts``: the same scenes and other questions as ``shapes_grouped``,
    and a count question only where the task drew the scene for one, so the count answers follow
    the task's own distribution (every value 0-4 present, none a majority) instead of the
    count of every kind (mostly 0 and 1)."""
    every = build_dataset("shapes_grouped", "train", seed=0, image_size=64)
    drawn = build_dataset("shapes_grouped_drawn_counts", "train", seed=0, image_size=64)
    task = build_dataset("shapes", "train", seed=0, image_size=64)
    answers = {"all": [], "drawn": []}
    for index in range(300):
        a, b, base = every[index], drawn[index], task[index]
        others = [[(question(m), m["answer"]) for m in group if m["question_type"] != "count"] for group in (a, b)]
        assert others[0] == others[1]
        counts = [m for m in b if m["question_type"] == "count"]
        if base["question_type"] == "count":
            assert [(question(m), m["answer"]) for m in counts] == [(question(base), base["answer"])]
        else:
            assert counts == []
        answers["all"] += [m["answer"] for m in a if m["question_type"] == "count"]
        answers["drawn"] += [m["answer"] for m in counts]
    share = {name: {v: values.count(v) / len(values) for v in "01234"} for name, values in answers.items()}
    assert share["all"]["0"] + share["all"]["1"] > 0.7
    assert all(share["drawn"][v] > 0.05 for v in "01234") and max(share["drawn"].values()) < 0.4


def test_count_questions_must_be_all_or_drawn():
    with pytest.raises(ValueError, match="count_questions must be one of"):
        GroupedQuestions(build_dataset("shapes", "train", seed=0, image_size=64), count_questions="some")
