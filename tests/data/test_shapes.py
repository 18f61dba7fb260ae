"""shapes: every answer is re-derived from the pixels alone and must match.

A small pixel "oracle" finds the shapes in a rendered image (connected components that differ
from the background), names each one's colour (its exact palette colour, which the interior of
every shape keeps) and kind (a rectangle fills its bounding box, a triangle is narrow at the top,
a circle is neither). Captions, counts, colours, kinds and spatial relations are then recomputed
from these detections, independently of the renderer's own scene description.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from minivlm.data.drawing import COLORS, Shape, ShapeScene
from minivlm.data.shapes import ShapesDataset, describe_shapes

NUMBERS = {"a": 1, "two": 2, "three": 3, "four": 4}


@dataclass(frozen=True)
class Detected:
    kind: str
    color: str
    x: float  # centroid, fraction of the image width
    y: float


def detect_shapes(image: Image.Image, background: tuple[int, int, int]) -> list[Detected]:
    pixels = np.asarray(image, dtype=np.float64)
    background_rgb = np.array(background, dtype=np.float64)
    foreground = np.abs(pixels - background_rgb).max(-1) > 40
    labels, n_components = ndimage.label(foreground, structure=np.ones((3, 3)))
    found = []
    for component in range(1, n_components + 1):
        inside = labels == component
        ((rgb, _),) = Counter(map(tuple, pixels[inside].astype(int))).most_common(1)
        (color,) = [name for name, value in COLORS.items() if value == rgb]
        # Per-pixel coverage from the anti-aliased blend between background and shape colour.
        direction = np.array(rgb, dtype=np.float64) - background_rgb
        coverage = np.clip((pixels - background_rgb) @ direction / (direction @ direction), 0, 1)
        coverage *= ndimage.binary_dilation(inside, np.ones((3, 3)))
        solid = coverage > 0.5
        rows, columns = np.nonzero(solid)
        box = solid[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
        row_widths = box.sum(axis=1)
        quarter = max(1, box.shape[0] // 4)
        taper = row_widths[:quarter].mean() / row_widths[-quarter:].mean()
        kind = "rectangle" if box.mean() > 0.92 else "triangle" if taper < 0.45 else "circle"
        centre_y, centre_x = ndimage.center_of_mass(coverage)
        found.append(Detected(kind, color, centre_x / image.width, centre_y / image.height))
    return found


def parse_caption(caption: str) -> Counter:
    counts: Counter = Counter()
    for phrase in re.split(r", | and ", caption):
        number, color, noun = phrase.split(" ")
        counts[(noun.removesuffix("s"), color)] += NUMBERS[number]
    return counts


def answer_from_pixels(question: str, detections: list[Detected]) -> str:
    """What a careful person answers, looking only at the detected shapes."""
    if question == "Describe the image.":
        return describe_shapes([Shape(d.kind, d.color, d.x, d.y, 0.1, 0.1) for d in detections])
    if match := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(d.kind == match[1] for d in detections))
    if match := re.fullmatch(r"What color is the (\w+)\?", question):
        (only,) = [d for d in detections if d.kind == match[1]]
        return only.color
    if match := re.fullmatch(r"What is the (\w+) shape\?", question):
        (only,) = [d for d in detections if d.color == match[1]]
        return only.kind
    match = re.fullmatch(r"Is the (\w+) (left of|right of|above|below) the (\w+)\?", question)
    assert match, f"unexpected question {question!r}"
    (a,) = [d for d in detections if d.kind == match[1]]
    (b,) = [d for d in detections if d.kind == match[3]]
    holds = {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}
    return "yes" if holds[match[2]] else "no"


def image_of(sample: dict) -> Image.Image:
    (item,) = [i for i in sample["messages"][0]["content"] if i["type"] == "image"]
    return item["image"]


def test_sample_has_the_chat_format():
    sample = ShapesDataset(seed=0)[0]
    user, assistant = sample["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert [item["type"] for item in user["content"]] == ["image", "text"]
    assert image_of(sample).mode == "RGB" and image_of(sample).size == (64, 64)
    assert assistant["content"] == [{"type": "text", "text": sample["answer"]}]
    assert sample["task"] == "shapes" and sample["id"] == "shapes/train/0"
    assert sample["question_type"] in ShapesDataset.QUESTION_TYPES


@pytest.mark.parametrize("image_size", [64, 224])
def test_answers_match_what_the_pixels_show(image_size):
    dataset = ShapesDataset(split="test", seed=1, image_size=image_size)
    n = 150 if image_size == 64 else 40
    for index in range(n):
        sample = dataset[index]
        detections = detect_shapes(image_of(sample), sample["scene"].background)
        question = sample["messages"][0]["content"][-1]["text"]
        assert answer_from_pixels(question, detections) == sample["answer"], (
            sample["id"],
            question,
        )


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), index=st.integers(0, 10**6 - 1), image_size=st.integers(64, 256))
def test_answers_match_pixels_at_any_size_and_seed(seed, index, image_size):
    sample = ShapesDataset(seed=seed, image_size=image_size)[index]
    detections = detect_shapes(image_of(sample), sample["scene"].background)
    question = sample["messages"][0]["content"][-1]["text"]
    assert answer_from_pixels(question, detections) == sample["answer"]
    assert len(detections) == len(sample["scene"].shapes)


def test_captions_list_every_shape_once():
    dataset = ShapesDataset(seed=2, question_types=("caption",))
    for index in range(100):
        sample = dataset[index]
        expected = Counter((s.kind, s.color) for s in sample["scene"].shapes)
        assert parse_caption(sample["answer"]) == expected


def test_caption_order_is_canonical_whatever_the_drawing_order():
    shapes = [
        Shape("rectangle", "blue", 0.8, 0.8, 0.2, 0.2),
        Shape("circle", "red", 0.2, 0.2, 0.2, 0.2),
        Shape("circle", "red", 0.5, 0.5, 0.2, 0.2),
    ]
    assert describe_shapes(shapes) == "two red circles and a blue rectangle"
    assert describe_shapes(shapes[::-1]) == "two red circles and a blue rectangle"
    shapes.append(Shape("triangle", "black", 0.2, 0.8, 0.2, 0.2))
    assert describe_shapes(shapes) == "two red circles, a blue rectangle and a black triangle"


def test_questions_name_no_answer():
    dataset = ShapesDataset(seed=3, question_types=("count", "color", "shape", "position"))
    for index in range(200):
        sample = dataset[index]
        question_words = set(
            re.findall(r"\w+", sample["messages"][0]["content"][-1]["text"].lower())
        )
        if sample["question_type"] != "position":  # yes/no never appear in a question
            assert sample["answer"] not in question_words


def test_scene_method_returns_the_rendered_scene():
    dataset = ShapesDataset(seed=4)
    scene = dataset.scene(7)
    assert isinstance(scene, ShapeScene) and scene == dataset[7]["scene"]


def test_unknown_question_type_is_refused():
    with pytest.raises(ValueError, match="subset of"):
        ShapesDataset(question_types=("colour",))
