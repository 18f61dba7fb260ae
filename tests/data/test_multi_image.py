"""multi_image: each image is the rendering of its scene, and answers follow from the scenes."""

from __future__ import annotations

import re

import numpy as np

from minivlm.data.drawing import ORDINALS, render_scene
from minivlm.data.multi_image import MultiImageDataset


def images_of(sample):
    return [item["image"] for item in sample["messages"][0]["content"] if item["type"] == "image"]


def test_images_come_before_the_question_and_match_their_scenes():
    dataset = MultiImageDataset(seed=0)
    for index in range(40):
        sample = dataset[index]
        content = sample["messages"][0]["content"]
        assert [item["type"] for item in content[:-1]] == ["image"] * len(sample["scene"])
        assert content[-1]["type"] == "text"
        assert 2 <= len(sample["scene"]) <= 3
        for image, scene in zip(images_of(sample), sample["scene"]):
            # render_scene is checked against the pixels in test_shapes.
            assert np.array_equal(np.asarray(image), np.asarray(render_scene(scene, 64)))


def test_which_image_has_more_names_the_unique_maximum():
    dataset = MultiImageDataset(seed=1, question_types=("more",))
    for index in range(200):
        sample = dataset[index]
        question = sample["messages"][0]["content"][-1]["text"]
        scenes = sample["scene"]
        match = re.fullmatch(r"Which image has (more|the most) (\w+)s\?", question)
        assert match and (match[1] == "more") == (len(scenes) == 2), question
        counts = [scene.count(kind=match[2]) for scene in scenes]
        best = int(np.argmax(counts))
        assert sorted(counts)[-2] < counts[best], counts  # strictly more than every other image
        assert sample["answer"] == f"the {ORDINALS[best]} image"


def test_same_color_answer_follows_the_colours_of_all_images():
    dataset = MultiImageDataset(seed=2, question_types=("same_color",))
    for index in range(200):
        sample = dataset[index]
        scenes = sample["scene"]
        which = "both images" if len(scenes) == 2 else "all three images"
        assert (
            sample["messages"][0]["content"][-1]["text"]
            == f"Are the shapes in {which} the same color?"
        )
        colors = {shape.color for scene in scenes for shape in scene.shapes}
        assert all(len({s.color for s in scene.shapes}) == 1 for scene in scenes)
        assert sample["answer"] == ("yes" if len(colors) == 1 else "no")
