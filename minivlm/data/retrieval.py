"""``retrieval``: (image, caption) pairs whose captions pin down the image.

Each image places 2-3 shapes in distinct cells of a 3x3 grid, each ``small`` or ``large``; the
caption names every shape's size, colour, kind and place in reading order (top-left first):

    "a large red circle at the top left and a small teal triangle in the center"

With 48 (size, colour, kind) combinations per shape and 36-84 cell choices there are ~10^7
captions, so captions in a batch are practically always distinct, which contrastive
image-text training (CLIP) and recall@k evaluation need. Samples carry ``"image"`` and
``"caption"`` for contrastive use, and a captioning conversation
("Describe the image in detail." -> caption) for generative use.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from minivlm.data.drawing import (
    COLOR_NAMES,
    RGB,
    SHAPES,
    Shape,
    ShapeScene,
    join_phrases,
    light_background,
    random_shape_size,
    render_scene,
)
from minivlm.data.sample import image_item, vqa_sample
from minivlm.data.synthetic import SyntheticDataset

GRID = 3
#: Phrase for each grid cell, in reading order (row-major from the top left).
CELL_PHRASES = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)  # fmt: skip
#: Longer side of a shape as a fraction of the image; a grid cell is 1/3 wide.
SIZE_RANGES = {"small": (0.12, 0.16), "large": (0.24, 0.28)}
CELL_MARGIN = 0.02
MIN_SHAPES, MAX_SHAPES = 2, 3


@dataclass(frozen=True)
class GridShape:
    shape: Shape
    size: str  # "small" or "large"
    cell: int  # 0..8, row-major

    def phrase(self) -> str:
        return f"a {self.size} {self.shape.color} {self.shape.kind} {CELL_PHRASES[self.cell]}"


@dataclass(frozen=True)
class GridScene:
    """Shapes in distinct grid cells, sorted by cell (the caption order)."""

    background: RGB
    items: tuple[GridShape, ...]

    def caption(self) -> str:
        return join_phrases([item.phrase() for item in self.items])

    def shape_scene(self) -> ShapeScene:
        return ShapeScene(self.background, tuple(item.shape for item in self.items))


class RetrievalDataset(SyntheticDataset):
    """Image-caption pairs for retrieval and captioning (see the module docstring).

    Samples carry ``"image"``, ``"caption"`` and ``"scene"`` (the :class:`GridScene`).
    """

    task = "retrieval"
    QUESTION_TYPES = ("caption",)

    def generate(self, rng: random.Random, sample_id: str) -> dict[str, Any]:
        cells = sorted(rng.sample(range(GRID * GRID), rng.randint(MIN_SHAPES, MAX_SHAPES)))
        items = []
        for cell in cells:
            kind, color, size = (
                rng.choice(SHAPES),
                rng.choice(COLOR_NAMES),
                rng.choice(tuple(SIZE_RANGES)),
            )
            width, height = random_shape_size(rng, kind, SIZE_RANGES[size])
            row, column = divmod(cell, GRID)
            # Jitter inside the cell, keeping the shape CELL_MARGIN clear of the cell's edges so
            # shapes in neighbouring cells never touch.
            x = (column + 0.5) / GRID + rng.uniform(-1, 1) * (
                1 / GRID - width - 2 * CELL_MARGIN
            ) / 2
            y = (row + 0.5) / GRID + rng.uniform(-1, 1) * (1 / GRID - height - 2 * CELL_MARGIN) / 2
            items.append(GridShape(Shape(kind, color, x, y, width, height), size, cell))
        scene = GridScene(light_background(rng), tuple(items))
        image = render_scene(scene.shape_scene(), self.image_size)
        caption = scene.caption()
        return vqa_sample(
            visuals=[image_item(image)],
            question="Describe the image in detail.",
            answer=caption,
            task=self.task,
            sample_id=sample_id,
            question_type="caption",
            scene=scene,
            image=image,
            caption=caption,
        )
