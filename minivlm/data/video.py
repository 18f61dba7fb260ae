"""``video``: one shape moving in a straight line across ``n_frames`` frames.

Question: "Which way does the shape move?" -> ``left`` / ``right`` / ``up`` / ``down`` (uniform).
The shape travels between 50 % and 100 % of the free space along its axis (at least a third of
the image at the default sizes), in equal steps, and never leaves the frame; its position across
the motion axis is random. Frames go in the user turn as ``{"type": "video", "video": [frames]}``.
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
    light_background,
    random_shape_size,
    render_scene,
)
from minivlm.data.sample import video_item, vqa_sample
from minivlm.data.synthetic import SyntheticDataset

DIRECTIONS = ("left", "right", "up", "down")
#: Unit displacement of each direction in image coordinates (y grows downwards).
DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BORDER = 0.03


@dataclass(frozen=True)
class MovingShape:
    """A shape starting at ``start`` and moving ``step`` (fraction of the image) per frame."""

    start: Shape
    direction: str
    step: float
    n_frames: int
    background: RGB

    def frames(self) -> list[ShapeScene]:
        dx, dy = DIRECTION_VECTORS[self.direction]
        return [
            ShapeScene(self.background, (self.start.moved(dx * self.step * t, dy * self.step * t),))
            for t in range(self.n_frames)
        ]


class VideoDataset(SyntheticDataset):
    """Motion-direction questions on short clips (see the module docstring).

    Args:
        n_frames: frames per clip (>= 2; default 6). Other arguments as
            :class:`~minivlm.data.synthetic.SyntheticDataset`.

    Samples carry ``"scene"``: the :class:`MovingShape` that was rendered.
    """

    task = "video"
    QUESTION_TYPES = ("direction",)

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        image_size: int = 64,
        length: int | None = None,
        question_types: tuple[str, ...] | None = None,
        n_frames: int = 6,
    ) -> None:
        super().__init__(split, seed, image_size, length, question_types)
        if not isinstance(n_frames, int) or n_frames < 2:
            raise ValueError(
                f"n_frames must be an integer >= 2 (motion needs two frames), got {n_frames!r}"
            )
        self.n_frames = n_frames

    def generate(self, rng: random.Random, sample_id: str) -> dict[str, Any]:
        direction = rng.choice(DIRECTIONS)
        kind, color = rng.choice(SHAPES), rng.choice(COLOR_NAMES)
        width, height = random_shape_size(rng, kind, (0.16, 0.26))
        dx, dy = DIRECTION_VECTORS[direction]
        along_half, across_half = (width / 2, height / 2) if dx else (height / 2, width / 2)
        low, high = BORDER + along_half, 1 - BORDER - along_half
        travel = rng.uniform(0.5, 1.0) * (high - low)
        begin = rng.uniform(low, high - travel)  # the low end of the path
        along = begin if dx + dy > 0 else begin + travel  # right/down start low, left/up start high
        across = rng.uniform(BORDER + across_half, 1 - BORDER - across_half)
        x, y = (along, across) if dx else (across, along)
        clip = MovingShape(
            start=Shape(kind, color, x, y, width, height),
            direction=direction,
            step=travel / (self.n_frames - 1),
            n_frames=self.n_frames,
            background=light_background(rng),
        )
        frames = [render_scene(scene, self.image_size) for scene in clip.frames()]
        return vqa_sample(
            visuals=[video_item(frames)],
            question="Which way does the shape move?",
            answer=direction,
            task=self.task,
            sample_id=sample_id,
            question_type="direction",
            scene=clip,
        )
