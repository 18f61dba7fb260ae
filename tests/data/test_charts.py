"""charts: bars measured in the pixels agree with the chart's values and with the answers."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from minivlm.data.charts import (
    CATEGORIES,
    MAX_BARS,
    BarChart,
    ChartsDataset,
    chart_layout,
    max_bars,
    render_chart,
)
from minivlm.data.drawing import COLORS


def measure_bars(image, bar_color: str) -> list[tuple[int, int]]:
    """``(centre column, height in pixels)`` of each run of columns containing the bar colour."""
    pixels = np.asarray(image).astype(int)
    is_bar = np.abs(pixels - np.array(COLORS[bar_color])).sum(-1) == 0
    columns = np.flatnonzero(is_bar.any(axis=0))
    runs = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
    return [(int(run.mean()), int(is_bar[:, run[len(run) // 2]].sum())) for run in runs]


def question_of(sample):
    return sample["messages"][0]["content"][-1]["text"]


@pytest.mark.parametrize("image_size", [64, 224])
def test_bar_heights_in_pixels_follow_the_values(image_size):
    dataset = ChartsDataset(split="test", seed=0, image_size=image_size)
    for index in range(60):
        sample = dataset[index]
        chart: BarChart = sample["scene"]
        bars = measure_bars(sample["messages"][0]["content"][0]["image"], chart.bar_color)
        assert len(bars) == len(chart.values), sample["id"]
        heights = np.array([height for _, height in bars], dtype=float)
        expected = heights.max() * np.array(chart.values) / max(chart.values)
        assert np.abs(heights - expected).max() <= 1.0, (sample["id"], heights, chart.values)


def test_answers_are_what_the_chart_shows():
    dataset = ChartsDataset(seed=1)
    for index in range(300):
        sample = dataset[index]
        chart: BarChart = sample["scene"]
        bars = measure_bars(sample["messages"][0]["content"][0]["image"], chart.bar_color)
        heights = [height for _, height in bars]
        tallest, shortest = int(np.argmax(heights)), int(np.argmin(heights))
        # The asked extreme is unique in the pixels too, not only in the numbers.
        question = question_of(sample)
        expected = {
            "What is the highest value in the bar chart?": str(chart.values[tallest]),
            "What is the lowest value in the bar chart?": str(chart.values[shortest]),
            "Which bar is the tallest?": chart.labels[tallest],
            "Which bar is the shortest?": chart.labels[shortest],
        }.get(question)
        if expected is None:
            label = re.fullmatch(r"What is the value of bar ([A-H])\?", question)[1]
            expected = str(chart.value_of(label))
        assert sample["answer"] == expected, (sample["id"], question)
        if sample["question_type"] in ("max_value", "tallest"):
            assert sorted(heights)[-2] < heights[tallest]
        if sample["question_type"] in ("min_value", "shortest"):
            assert sorted(heights)[1] > heights[shortest]


def test_every_bar_has_a_value_label_above_and_a_category_label_below():
    chart = BarChart(
        labels=("A", "C", "F"), values=(12, 57, 3), bar_color="blue", background=(250, 250, 250)
    )
    image = np.asarray(render_chart(chart, 64)).astype(int)
    layout = chart_layout(chart, 64)
    is_text = image.sum(-1) < 300  # dark grey or black: the text (bars are blue)
    for left, top, right, _ in layout.bar_boxes:
        above = is_text[max(0, top - layout.font_size - 2) : top, left : right + 1]
        below = is_text[layout.baseline + 1 :, left : right + 1]
        assert above.sum() >= 8 and below.sum() >= 8


def test_labels_are_distinct_sorted_letters_and_values_in_range():
    dataset = ChartsDataset(seed=2, image_size=224)
    for index in range(200):
        chart = dataset.scene(index)
        assert list(chart.labels) == sorted(set(chart.labels)) and set(chart.labels) <= set(
            CATEGORIES
        )
        assert 3 <= len(chart.labels) <= MAX_BARS
        assert all(1 <= value <= 99 for value in chart.values)


def test_small_images_get_fewer_bars_so_value_labels_do_not_touch():
    assert max_bars(64) == 4 and max_bars(224) == MAX_BARS
    assert max(len(ChartsDataset(seed=3, image_size=64).scene(i).labels) for i in range(100)) == 4
    for image_size in (48, 64, 96, 224):
        chart = BarChart(
            tuple("ABCDEF"[: max_bars(image_size)]),
            (88,) * max_bars(image_size),
            "red",
            (255, 255, 255),
        )
        layout = chart_layout(chart, image_size)
        label_rows = np.asarray(render_chart(chart, image_size)).sum(-1)[: layout.plot_top - 1]
        centres = [(left + right) / 2 for left, _, right, _ in layout.bar_boxes]
        for a, b in itertools.pairwise(centres):
            between = label_rows[:, round(a) + 1 : round(b)]
            # Some column between two neighbouring "88" labels is pure background.
            assert (between == 3 * 255).all(axis=0).any(), image_size
