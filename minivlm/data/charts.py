"""``charts``: bar charts with category labels under the bars and value labels above them.

A chart has 3-6 bars, as many as fit with readable, non-touching value labels (3-4 at 64x64,
3-6 from about 100 pixels; see :func:`max_bars`); categories are distinct capital letters
``A`` .. ``H`` shown left to right in alphabetical order (single letters stay legible at 64x64);
values are integers 1-99.
Bars are scaled so the tallest fills the plot area; the value label on each bar gives the number.

Question types (answer drawn uniformly first, then a chart built to match it):

============ ============================================== =====================
type         question                                       answer
============ ============================================== =====================
max_value    "What is the highest value in the bar chart?"  "10" .. "99"
min_value    "What is the lowest value in the bar chart?"   "1" .. "90"
tallest      "Which bar is the tallest?"                    a category letter
shortest     "Which bar is the shortest?"                   a category letter
bar_value    "What is the value of bar C?"                  "1" .. "99"
============ ============================================== =====================

The tallest (shortest) bar exceeds (undercuts) every other bar by at least
:data:`MIN_VALUE_GAP` and 10 %, so the extreme is unambiguous by eye, not only by its label.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from minivlm.data.drawing import COLORS, RGB, light_background, load_font
from minivlm.data.sample import image_item, vqa_sample
from minivlm.data.synthetic import SyntheticDataset

CATEGORIES = tuple("ABCDEFGH")
MIN_BARS, MAX_BARS = 3, 6
MIN_VALUE, MAX_VALUE = 1, 99
MIN_VALUE_GAP = 3
#: Bar colours: every palette colour except black, which is the colour of the text.
BAR_COLORS = tuple(name for name in COLORS if name != "black")
TEXT_COLOR: RGB = (0, 0, 0)


@dataclass(frozen=True)
class BarChart:
    """What a chart shows: ``labels[i]`` has value ``values[i]``, bars left to right."""

    labels: tuple[str, ...]
    values: tuple[int, ...]
    bar_color: str
    background: RGB

    def value_of(self, label: str) -> int:
        return self.values[self.labels.index(label)]


@dataclass(frozen=True)
class ChartLayout:
    """Pixel geometry of a rendered chart (exposed so tests can measure the bars)."""

    font_size: int
    baseline: int  # y of the axis line; bars end on the row above it
    plot_top: int  # y reached by the tallest bar
    bar_boxes: tuple[tuple[int, int, int, int], ...]  # (left, top, right, bottom) per bar


@dataclass(frozen=True)
class _TextMetrics:
    font_size: int
    cap_height: int  # pixels from the text baseline to the top of digits and capitals
    label_width: float  # width of the widest value label, "88"
    gap: int  # free pixels kept between neighbouring value labels and around text


@functools.lru_cache(maxsize=32)
def _text_metrics(image_size: int) -> _TextMetrics:
    # At least 10 px: below that the bundled font's digits are 5 px tall and hard to tell apart.
    font_size = max(10, round(image_size * 0.09))
    font = load_font(font_size)
    cap_height = -font.getbbox("0123456789ABCDEFGH", anchor="ls")[1]
    return _TextMetrics(font_size, cap_height, font.getlength("88"), max(2, font_size // 4))


def max_bars(image_size: int) -> int:
    """Most bars (3..6) whose two-digit value labels fit side by side at ``image_size``:
    4 at 64 pixels, 6 from about 100 pixels up."""
    metrics = _text_metrics(image_size)
    fitting = int((image_size - 2 * _margin(image_size)) // (metrics.label_width + metrics.gap))
    return max(MIN_BARS, min(MAX_BARS, fitting))


def _margin(image_size: int) -> int:
    return max(1, image_size // 48)


def chart_layout(chart: BarChart, image_size: int) -> ChartLayout:
    """Where every bar goes at ``image_size``: category letters along the bottom edge, the axis
    above them, value labels above each bar and room for the tallest bar's label at the top."""
    metrics = _text_metrics(image_size)
    margin = _margin(image_size)
    baseline = image_size - margin - metrics.cap_height - metrics.gap
    plot_top = margin + metrics.cap_height + metrics.gap
    slot = (image_size - 2 * margin) / len(chart.labels)
    bar_width = max(3, round(slot * 0.7))
    top_value = max(chart.values)
    boxes = []
    for position, value in enumerate(chart.values):
        centre = margin + slot * (position + 0.5)
        left = round(centre - bar_width / 2)
        height = max(1, round((baseline - plot_top) * value / top_value))
        boxes.append((left, baseline - height, left + bar_width - 1, baseline - 1))
    return ChartLayout(metrics.font_size, baseline, plot_top, tuple(boxes))


def render_chart(chart: BarChart, image_size: int) -> Image.Image:
    """Draw ``chart`` at ``image_size`` x ``image_size``.

    Drawn directly at the output size (no supersampling): text rendered large and then
    averaged down would blur; Pillow's FreeType text is already anti-aliased.
    """
    layout = chart_layout(chart, image_size)
    margin = _margin(image_size)
    image = Image.new("RGB", (image_size, image_size), chart.background)
    draw = ImageDraw.Draw(image)
    font = load_font(layout.font_size)
    draw.line((0, layout.baseline, image_size - 1, layout.baseline), fill=TEXT_COLOR)
    for label, value, (left, top, right, bottom) in zip(
        chart.labels, chart.values, layout.bar_boxes
    ):
        draw.rectangle((left, top, right, bottom), fill=COLORS[chart.bar_color])
        centre = (left + right + 1) / 2
        # "ms" anchors the text baseline: digits and capitals have no descenders to leave room for.
        draw.text((centre, top - 2), str(value), fill=TEXT_COLOR, font=font, anchor="ms")
        draw.text((centre, image_size - margin), label, fill=TEXT_COLOR, font=font, anchor="ms")
    return image


#: The chart of the course page minivlm follows, whose one example dialogue is
#: "What is the highest value in the bar chart?" -> "42" (``make demo`` asks it).
SEED_CHART = BarChart(labels=("A", "B", "C", "D"), values=(25, 42, 31, 12), bar_color="blue",
                      background=(250, 250, 250))


def seed_chart_image(image_size: int = 64) -> Image.Image:
    """:data:`SEED_CHART` rendered at ``image_size`` (the ``tiny`` encoder's 64 px by default)."""
    return render_chart(SEED_CHART, image_size)


def chart_table(chart: BarChart) -> str:
    """The chart's data in reading order: ``"A 25, B 42, C 31, D 12"``."""
    return ", ".join(f"{label} {value}" for label, value in zip(chart.labels, chart.values))


def _extreme_gap(value: int) -> int:
    """How far other bars stay from an extreme ``value``: visible by eye, not only by label."""
    return max(MIN_VALUE_GAP, round(0.1 * value))


class ChartsDataset(SyntheticDataset):
    """Bar-chart question answering (table in the module docstring).

    Samples carry ``"scene"``: the :class:`BarChart` that was rendered.
    """

    task = "charts"
    QUESTION_TYPES = ("max_value", "min_value", "tallest", "shortest", "bar_value")

    def generate(self, rng: random.Random, sample_id: str) -> dict[str, Any]:
        question_type = rng.choice(self.question_types)
        n_bars = rng.randint(MIN_BARS, max_bars(self.image_size))
        if question_type in ("tallest", "shortest"):
            # The answer letter is drawn uniformly from all categories: drawing it from a sorted
            # subset would favour the early letters.
            wanted = rng.choice(CATEGORIES)
            others = rng.sample([c for c in CATEGORIES if c != wanted], n_bars - 1)
            labels = sorted([wanted, *others])
            target = labels.index(wanted)
        else:
            labels = sorted(rng.sample(CATEGORIES, n_bars))
            target = rng.randrange(n_bars)  # the bar a bar_value question asks about
        values = self._values(rng, question_type, n_bars, target)
        chart = BarChart(
            tuple(labels), tuple(values), rng.choice(BAR_COLORS), light_background(rng)
        )
        question, answer = {
            "max_value": ("What is the highest value in the bar chart?", str(max(values))),
            "min_value": ("What is the lowest value in the bar chart?", str(min(values))),
            "tallest": ("Which bar is the tallest?", labels[target]),
            "shortest": ("Which bar is the shortest?", labels[target]),
            "bar_value": (f"What is the value of bar {labels[target]}?", str(values[target])),
        }[question_type]
        return vqa_sample(
            visuals=[image_item(render_chart(chart, self.image_size))],
            question=question,
            answer=answer,
            task=self.task,
            sample_id=sample_id,
            question_type=question_type,
            scene=chart,
        )

    def questions_about(self, chart: BarChart) -> list[tuple[str, str, str]]:
        """Every question with one unambiguous answer on ``chart``: ``(type, question, answer)``.

        The highest and lowest values and every bar's value always; the tallest (shortest) bar only
        when it stands out by the gap this task's own tallest (shortest) questions guarantee. Also,
        for training only (no test question has this type), the whole chart read out as a table,
        ``"A 25, B 42, C 31"``: chart derendering as in DePlot / Pix2Struct (Liu et al. 2023, Lee
        et al. 2023), every label supervised in reading order, which is where reading starts.
        """
        values, labels = chart.values, chart.labels
        top, bottom = max(values), min(values)
        found = [("max_value", "What is the highest value in the bar chart?", str(top)),
                 ("min_value", "What is the lowest value in the bar chart?", str(bottom))]
        rest_top = sorted(values)[-2]
        if rest_top <= top - _extreme_gap(top):
            found.append(("tallest", "Which bar is the tallest?", labels[values.index(top)]))
        rest_bottom = sorted(values)[1]
        if rest_bottom >= bottom + _extreme_gap(bottom):
            found.append(("shortest", "Which bar is the shortest?", labels[values.index(bottom)]))
        found += [("bar_value", f"What is the value of bar {label}?", str(value))
                  for label, value in zip(labels, values)]
        found = [q for q in found if q[0] in self.question_types]
        return [("table", "Read the bar chart as a table.", chart_table(chart)), *found]

    @staticmethod
    def _values(rng: random.Random, question_type: str, n_bars: int, target: int) -> list[int]:
        """Bar values with the answer drawn first: bar ``target`` is the asked extreme/value."""
        if question_type in ("max_value", "tallest"):
            top = rng.randint(10, MAX_VALUE)
            others_max = top - _extreme_gap(top)
            values = [rng.randint(MIN_VALUE, others_max) for _ in range(n_bars)]
            values[target] = top
        elif question_type in ("min_value", "shortest"):
            bottom = rng.randint(MIN_VALUE, 90)
            others_min = bottom + _extreme_gap(bottom)
            values = [rng.randint(others_min, MAX_VALUE) for _ in range(n_bars)]
            values[target] = bottom
        else:
            values = [rng.randint(MIN_VALUE, MAX_VALUE) for _ in range(n_bars)]
        return values
