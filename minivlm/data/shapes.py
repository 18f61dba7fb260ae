"""``shapes``: 1-4 coloured shapes on a plain background; captions and questions about them.

Question types (each answer drawn uniformly, then a scene built to match it):

========== ====================================== ==========================================
type       question                               answers
========== ====================================== ==========================================
caption    "Describe the image."                  canonical caption, e.g. "two red circles
                                                  and a blue rectangle"
count      "How many circles are there?"          "0" .. "4"
color      "What color is the triangle?"          the 8 colour words (the shape is unique)
shape      "What is the red shape?"               circle / rectangle / triangle (unique colour)
position   "Is the triangle left of the circle?"  yes / no (both shapes unique; left of,
                                                  right of, above, below; centres at least
                                                  0.1 of the image apart along that axis)
========== ====================================== ==========================================

The canonical caption lists groups of identical shapes in the order of
:data:`~minivlm.data.drawing.SHAPES` (circle, rectangle, triangle), colours within a shape in the
order of :data:`~minivlm.data.drawing.COLORS`, so one scene has exactly one caption.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from minivlm.data.drawing import (
    COLOR_NAMES,
    SHAPES,
    Shape,
    ShapeScene,
    count_phrase,
    join_phrases,
    light_background,
    place_shapes,
    plural,
    render_scene,
)
from minivlm.data.sample import image_item, vqa_sample
from minivlm.data.synthetic import SyntheticDataset, stable_seed

MAX_SHAPES = 4
#: Minimum centre distance, as a fraction of the image, for a spatial relation to count.
RELATION_MARGIN = 0.1
RELATIONS = ("left of", "right of", "above", "below")


def describe_shapes(shapes: Sequence[Shape]) -> str:
    """Canonical caption: ``"two red circles, a teal rectangle and a black triangle"``."""
    return describe_specs([(s.kind, s.color) for s in shapes])


def describe_specs(specs: Sequence[tuple[str, str]]) -> str:
    """Canonical caption of shapes given as ``(kind, color)`` pairs (see the module docstring)."""
    groups = Counter(specs)
    ordered = sorted(groups, key=lambda g: (SHAPES.index(g[0]), COLOR_NAMES.index(g[1])))
    return join_phrases([count_phrase(groups[g], g[0], g[1]) for g in ordered])


def relation_holds(a: Shape, b: Shape, relation: str, margin: float = RELATION_MARGIN) -> bool:
    """Whether ``a`` is ``relation`` ``b`` by at least ``margin`` (image y grows downwards)."""
    if relation == "left of":
        return b.x - a.x >= margin
    if relation == "right of":
        return a.x - b.x >= margin
    if relation == "above":
        return b.y - a.y >= margin
    if relation == "below":
        return a.y - b.y >= margin
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


OPPOSITE_RELATION = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}

#: What a question builder returns: shape specs ``(kind, color)`` to place, the question, the
#: answer, and a predicate the layout must satisfy (or None).
QuestionPlan = tuple[list[tuple[str, str]], str, str, Callable[[tuple[Shape, ...]], bool] | None]


def random_specs(
    rng: random.Random,
    count: int,
    kinds: Sequence[str] = SHAPES,
    colors: Sequence[str] = COLOR_NAMES,
) -> list[tuple[str, str]]:
    """``count`` random ``(kind, color)`` pairs drawn from the given vocabularies."""
    return [(rng.choice(kinds), rng.choice(colors)) for _ in range(count)]


class ShapesDataset(SyntheticDataset):
    """Captioning and VQA on scenes of 1-4 shapes (table in the module docstring).

    Samples carry ``"scene"``: the :class:`~minivlm.data.drawing.ShapeScene` that was rendered.
    """

    task = "shapes"
    QUESTION_TYPES = ("caption", "count", "color", "shape", "position")

    def generate(self, rng: random.Random, sample_id: str) -> dict[str, Any]:
        question_type = rng.choice(self.question_types)
        ask = {
            "caption": self._caption,
            "count": self._count,
            "color": self._color,
            "shape": self._shape,
            "position": self._position,
        }[question_type]
        specs, question, answer, accept = ask(rng)
        rng.shuffle(specs)  # drawing order carries no information about the answer
        scene = ShapeScene(light_background(rng), place_shapes(rng, specs, accept=accept))
        return vqa_sample(
            visuals=[image_item(render_scene(scene, self.image_size))],
            question=question,
            answer=answer,
            task=self.task,
            sample_id=sample_id,
            question_type=question_type,
            scene=scene,
        )

    def questions_about(self, scene: ShapeScene) -> list[tuple[str, str, str]]:
        """Every question with one unambiguous answer on ``scene``: ``(type, question, answer)``.

        The caption and the count of each shape kind always; the colour of each kind shown once;
        the kind of each colour shown once; for every two kinds shown once, whether one is left
        of / right of / above / below the other, where their centres are :data:`RELATION_MARGIN`
        apart along that axis (one relation per pair, the relation and the order of the two kinds
        drawn from a generator seeded by the scene, so the same scene asks the same questions).
        """
        shapes = scene.shapes
        found = [("caption", "Describe the image.", describe_shapes(shapes))]
        found += [("count", f"How many {plural(kind)} are there?", str(scene.count(kind))) for kind in SHAPES]
        unique_kinds = [s for s in shapes if scene.count(kind=s.kind) == 1]
        found += [("color", f"What color is the {s.kind}?", s.color) for s in unique_kinds]
        found += [("shape", f"What is the {s.color} shape?", s.kind)
                  for s in shapes if scene.count(color=s.color) == 1]
        by_kind = sorted(unique_kinds, key=lambda s: SHAPES.index(s.kind))
        rng = random.Random(stable_seed("relations", repr(shapes)))
        for i, first in enumerate(by_kind):
            for second in by_kind[i + 1:]:
                a, b = (first, second) if rng.random() < 0.5 else (second, first)
                decidable = [r for r in RELATIONS if relation_holds(a, b, r) or relation_holds(a, b, OPPOSITE_RELATION[r])]
                if decidable:
                    relation = rng.choice(decidable)
                    answer = "yes" if relation_holds(a, b, relation) else "no"
                    found.append(("position", f"Is the {a.kind} {relation} the {b.kind}?", answer))
        return [q for q in found if q[0] in self.question_types]

    def _caption(self, rng: random.Random) -> QuestionPlan:
        specs = random_specs(rng, rng.randint(1, MAX_SHAPES))
        return specs, "Describe the image.", describe_specs(specs), None

    def _count(self, rng: random.Random) -> QuestionPlan:
        kind = rng.choice(SHAPES)
        count = rng.randint(0, MAX_SHAPES)
        total = rng.randint(max(count, 1), MAX_SHAPES)
        others = [k for k in SHAPES if k != kind]
        specs = random_specs(rng, count, kinds=[kind]) + random_specs(
            rng, total - count, kinds=others
        )
        return specs, f"How many {plural(kind)} are there?", str(count), None

    def _color(self, rng: random.Random) -> QuestionPlan:
        kind, color = rng.choice(SHAPES), rng.choice(COLOR_NAMES)
        others = [k for k in SHAPES if k != kind]
        specs = [(kind, color), *random_specs(rng, rng.randint(0, MAX_SHAPES - 1), kinds=others)]
        return specs, f"What color is the {kind}?", color, None

    def _shape(self, rng: random.Random) -> QuestionPlan:
        kind, color = rng.choice(SHAPES), rng.choice(COLOR_NAMES)
        others = [c for c in COLOR_NAMES if c != color]
        specs = [(kind, color), *random_specs(rng, rng.randint(0, MAX_SHAPES - 1), colors=others)]
        return specs, f"What is the {color} shape?", kind, None

    def _position(self, rng: random.Random) -> QuestionPlan:
        first, second, third = rng.sample(SHAPES, 3)
        relation = rng.choice(RELATIONS)
        answer = rng.choice(("yes", "no"))
        true_relation = relation if answer == "yes" else OPPOSITE_RELATION[relation]
        # Distractors use the third kind only, so "the <first>" and "the <second>" stay unique.
        specs = random_specs(rng, 1, kinds=[first]) + random_specs(rng, 1, kinds=[second])
        specs += random_specs(rng, rng.randint(0, MAX_SHAPES - 2), kinds=[third])

        def accept(shapes: tuple[Shape, ...]) -> bool:
            a = next(s for s in shapes if s.kind == first)
            b = next(s for s in shapes if s.kind == second)
            return relation_holds(a, b, true_relation)

        return specs, f"Is the {first} {relation} the {second}?", answer, accept
