"""retrieval: captions describe the image exactly and tell images apart."""

from __future__ import annotations

import re

import numpy as np

from minivlm.data.drawing import render_scene
from minivlm.data.retrieval import CELL_PHRASES, GRID, SIZE_RANGES, RetrievalDataset

PHRASE = re.compile(
    r"a (small|large) (\w+) (circle|rectangle|triangle) ("
    + "|".join(sorted(CELL_PHRASES, key=len, reverse=True))
    + ")"
)


def test_sample_carries_image_caption_and_a_captioning_conversation():
    sample = RetrievalDataset(seed=0)[0]
    user, assistant = sample["messages"]
    assert user["content"][0] == {"type": "image", "image": sample["image"]}
    assert user["content"][1]["text"] == "Describe the image in detail."
    assert assistant["content"][0]["text"] == sample["caption"] == sample["answer"]
    assert np.array_equal(
        np.asarray(sample["image"]), np.asarray(render_scene(sample["scene"].shape_scene(), 64))
    )


def test_caption_names_each_shape_with_its_size_cell_colour_and_kind():
    dataset = RetrievalDataset(seed=1)
    for index in range(200):
        sample = dataset[index]
        phrases = PHRASE.findall(sample["caption"])
        shapes = [item.shape for item in sample["scene"].items]
        assert len(phrases) == len(shapes) and 2 <= len(shapes) <= 3
        for (size, color, kind, place), shape in zip(phrases, shapes):
            # The cell is recomputed from the shape's coordinates, and the whole shape lies in it.
            column, row = int(shape.x * GRID), int(shape.y * GRID)
            assert place == CELL_PHRASES[row * GRID + column]
            left, top, right, bottom = shape.box()
            assert (
                int(left * GRID) == int(right * GRID) == column
                and int(top * GRID) == int(bottom * GRID) == row
            )
            low, high = SIZE_RANGES[size]
            assert low <= max(shape.width, shape.height) <= high
            assert (color, kind) == (shape.color, shape.kind)


def test_captions_are_almost_all_distinct():
    captions = [RetrievalDataset(split="test", seed=0)[i]["caption"] for i in range(500)]
    assert len(set(captions)) >= 495
