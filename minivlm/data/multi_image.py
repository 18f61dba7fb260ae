"""``multi_image``: questions that need comparing two or three shape images.

The user turn shows 2 or 3 images (content items in order), then the question. Images are named
by ordinal words, so answers read naturally and stay one fixed phrase per image:

============ =========================================================== =====================
type         question                                                    answer
============ =========================================================== =====================
more         "Which image has more circles?" (2 images),                 "the first image",
             "Which image has the most circles?" (3 images)              "the second image",
                                                                         "the third image"
same_color   "Are the shapes in both images the same color?" (2),        yes / no
             "Are the shapes in all three images the same color?" (3)
============ =========================================================== =====================

For ``more``, the answer image has strictly more shapes of the asked kind than every other image,
and the answer position is uniform over first/second/third (three images whenever the answer is
"the third image"). For ``same_color``, every image is single-coloured; "yes" means one colour
across all images, "no" means at least two different colours.
"""

from __future__ import annotations

import random
from typing import Any

from minivlm.data.drawing import (
    COLOR_NAMES,
    ORDINALS,
    SHAPES,
    ShapeScene,
    light_background,
    place_shapes,
    plural,
    render_scene,
)
from minivlm.data.sample import image_item, vqa_sample
from minivlm.data.shapes import MAX_SHAPES, random_specs
from minivlm.data.synthetic import SyntheticDataset

MAX_IMAGES = 3


class MultiImageDataset(SyntheticDataset):
    """Multi-image comparison questions (table in the module docstring).

    Samples carry ``"scene"``: a tuple of :class:`~minivlm.data.drawing.ShapeScene`, one per image.
    """

    task = "multi_image"
    QUESTION_TYPES = ("more", "same_color")

    def generate(self, rng: random.Random, sample_id: str) -> dict[str, Any]:
        question_type = rng.choice(self.question_types)
        if question_type == "more":
            specs_per_image, question, answer = self._more(rng)
        else:
            specs_per_image, question, answer = self._same_color(rng)
        scenes = []
        for specs in specs_per_image:
            rng.shuffle(specs)
            scenes.append(ShapeScene(light_background(rng), place_shapes(rng, specs)))
        return vqa_sample(
            visuals=[image_item(render_scene(scene, self.image_size)) for scene in scenes],
            question=question,
            answer=answer,
            task=self.task,
            sample_id=sample_id,
            question_type=question_type,
            scene=tuple(scenes),
        )

    def questions_about(self, scenes: tuple[ShapeScene, ...]) -> list[tuple[str, str, str]]:
        """Every question with one unambiguous answer on ``scenes``: ``(type, question, answer)``.

        "Which image has more X?" for each kind X that one image shows strictly more often than
        every other; "the same color?" when every image is single-coloured.
        """
        n = len(scenes)
        comparative = "more" if n == 2 else "the most"
        found = []
        for kind in SHAPES:
            counts = [scene.count(kind) for scene in scenes]
            most = max(counts)
            if counts.count(most) == 1:
                found.append(("more", f"Which image has {comparative} {plural(kind)}?",
                              f"the {ORDINALS[counts.index(most)]} image"))
        colors = [{s.color for s in scene.shapes} for scene in scenes]
        if all(len(c) == 1 for c in colors):
            which = "both images" if n == 2 else "all three images"
            answer = "yes" if len(set.union(*colors)) == 1 else "no"
            found.append(("same_color", f"Are the shapes in {which} the same color?", answer))
        return [q for q in found if q[0] in self.question_types]

    @staticmethod
    def _more(rng: random.Random) -> tuple[list[list[tuple[str, str]]], str, str]:
        answer_index = rng.randrange(MAX_IMAGES)
        n_images = MAX_IMAGES if answer_index == MAX_IMAGES - 1 else rng.choice((2, 3))
        kind = rng.choice(SHAPES)
        most = rng.randint(1, MAX_SHAPES)
        counts = [rng.randint(0, most - 1) for _ in range(n_images)]
        counts[answer_index] = most
        others = [k for k in SHAPES if k != kind]
        specs_per_image = []
        for count in counts:
            n_distractors = rng.randint(0 if count else 1, MAX_SHAPES - count)
            specs_per_image.append(
                random_specs(rng, count, kinds=[kind])
                + random_specs(rng, n_distractors, kinds=others)
            )
        comparative = "more" if n_images == 2 else "the most"
        question = f"Which image has {comparative} {plural(kind)}?"
        return specs_per_image, question, f"the {ORDINALS[answer_index]} image"

    @staticmethod
    def _same_color(rng: random.Random) -> tuple[list[list[tuple[str, str]]], str, str]:
        n_images = rng.choice((2, 3))
        answer = rng.choice(("yes", "no"))
        if answer == "yes":
            colors = [rng.choice(COLOR_NAMES)] * n_images
        else:
            colors = [rng.choice(COLOR_NAMES) for _ in range(n_images)]
            while len(set(colors)) == 1:
                colors[rng.randrange(n_images)] = rng.choice(COLOR_NAMES)
        specs_per_image = [random_specs(rng, rng.randint(1, 3), colors=[color]) for color in colors]
        which = "both images" if n_images == 2 else "all three images"
        return specs_per_image, f"Are the shapes in {which} the same color?", answer
