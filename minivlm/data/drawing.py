"""Shared vocabulary and PIL drawing helpers for the procedural datasets.

Colours and shape names are the easy-VQA vocabulary (github.com/vzhou842/easy-VQA), so a model
trained on a mixture of easy-VQA and synthetic scenes sees one word for one concept (``color``,
``rectangle``). Scenes are described in *normalised* coordinates (0..1, origin top left) so one
scene renders at any resolution; drawing happens at ``SUPERSAMPLE`` times the output size and is
box-filtered down, which anti-aliases edges while leaving the interior of every shape exactly its
palette colour (useful for pixel-level tests and for readability at 64x64).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]

#: The eight easy-VQA colour words, with saturated values that stay distinct after anti-aliasing.
COLORS: dict[str, RGB] = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 200, 0),
    "teal": (0, 140, 140),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
    "brown": (140, 75, 20),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

#: The easy-VQA shape words; their order is the canonical order of captions.
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")

NUMBER_WORDS = ("no", "a", "two", "three", "four", "five", "six")
ORDINALS = ("first", "second", "third", "fourth")

#: Drawing happens at this multiple of the output size, then a box filter averages it down.
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    """One filled shape. ``x, y`` is the centre and ``width, height`` the bounding box, all as
    fractions of the image side (so ``x=0.5`` is the middle at any resolution)."""

    kind: str
    color: str
    x: float
    y: float
    width: float
    height: float

    def box(self) -> tuple[float, float, float, float]:
        """``(left, top, right, bottom)`` in normalised coordinates."""
        return (
            self.x - self.width / 2,
            self.y - self.height / 2,
            self.x + self.width / 2,
            self.y + self.height / 2,
        )

    def moved(self, dx: float, dy: float) -> Shape:
        return Shape(self.kind, self.color, self.x + dx, self.y + dy, self.width, self.height)


@dataclass(frozen=True)
class ShapeScene:
    """A plain background with non-overlapping shapes (what the shape tasks render)."""

    background: RGB
    shapes: tuple[Shape, ...]

    def count(self, kind: str | None = None, color: str | None = None) -> int:
        return sum(
            (kind is None or s.kind == kind) and (color is None or s.color == color)
            for s in self.shapes
        )


def light_background(rng: random.Random) -> RGB:
    """A near-white, slightly tinted background (as in easy-VQA), far from every palette colour."""
    return (rng.randint(232, 255), rng.randint(232, 255), rng.randint(232, 255))


def random_shape_size(
    rng: random.Random, kind: str, size_range: tuple[float, float]
) -> tuple[float, float]:
    """``(width, height)`` for a shape: circles are round, triangles equilateral-ish,
    rectangles anywhere from square to 2:1 in either orientation (as easy-VQA draws them)."""
    side = rng.uniform(*size_range)
    if kind == "rectangle":
        short = side * rng.uniform(0.5, 1.0)
        return (side, short) if rng.random() < 0.5 else (short, side)
    if kind == "triangle":
        return side, side * 0.9
    return side, side


def place_shapes(
    rng: random.Random,
    specs: Sequence[tuple[str, str]],
    *,
    size_range: tuple[float, float] = (0.16, 0.28),
    gap: float = 0.05,
    accept: Callable[[tuple[Shape, ...]], bool] | None = None,
    max_tries: int = 1000,
) -> tuple[Shape, ...]:
    """Place shapes ``(kind, color)`` at random, non-overlapping positions inside the image.

    Bounding boxes stay ``gap`` apart and ``gap / 2`` from the border, so shapes never touch (a
    person, and a connected-component test, can count them). ``accept`` is an extra predicate on
    the whole layout, e.g. "the triangle is left of the rectangle"; layouts are resampled until
    it holds, which keeps every sample a pure function of ``rng``.

    Raises:
        ValueError: no valid layout within ``max_tries`` (the specs cannot fit).
    """
    margin = gap / 2
    for _ in range(max_tries):
        placed: list[Shape] = []
        for kind, color in specs:
            width, height = random_shape_size(rng, kind, size_range)
            for _ in range(50):
                x = rng.uniform(margin + width / 2, 1 - margin - width / 2)
                y = rng.uniform(margin + height / 2, 1 - margin - height / 2)
                candidate = Shape(kind, color, x, y, width, height)
                if all(_boxes_apart(candidate, other, gap) for other in placed):
                    placed.append(candidate)
                    break
            else:
                break
        if len(placed) == len(specs) and (accept is None or accept(tuple(placed))):
            return tuple(placed)
    raise ValueError(
        f"could not place {len(specs)} shapes of size {size_range} with gap {gap} in "
        f"{max_tries} tries; use fewer or smaller shapes"
    )


def _boxes_apart(a: Shape, b: Shape, gap: float) -> bool:
    a_left, a_top, a_right, a_bottom = a.box()
    b_left, b_top, b_right, b_bottom = b.box()
    return (
        a_right + gap <= b_left
        or b_right + gap <= a_left
        or a_bottom + gap <= b_top
        or b_bottom + gap <= a_top
    )


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, canvas_size: int) -> None:
    """Draw ``shape`` in its palette colour on a square canvas of ``canvas_size`` pixels."""
    left, top, right, bottom = (v * canvas_size for v in shape.box())
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape.kind == "rectangle":
        draw.rectangle((left, top, right, bottom), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}; expected one of {SHAPES}")


def render_scene(scene: ShapeScene, image_size: int) -> Image.Image:
    """Render a :class:`ShapeScene` as an ``image_size`` x ``image_size`` RGB image."""
    canvas = new_canvas(scene.background, image_size)
    draw = ImageDraw.Draw(canvas)
    for shape in scene.shapes:
        draw_shape(draw, shape, canvas.width)
    return downsample(canvas, image_size)


def new_canvas(background: RGB, image_size: int) -> Image.Image:
    """A supersampled canvas; finish with :func:`downsample`."""
    return Image.new("RGB", (image_size * SUPERSAMPLE, image_size * SUPERSAMPLE), background)


def downsample(canvas: Image.Image, image_size: int) -> Image.Image:
    # BOX averages each SUPERSAMPLE x SUPERSAMPLE block exactly: anti-aliased edges, no ringing,
    # and uniform regions keep their exact colour.
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


@functools.lru_cache(maxsize=32)
def load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` pixels (scalable on Pillow >= 10.1 with FreeType)."""
    return ImageFont.load_default(size=size)


def count_phrase(count: int, kind: str, color: str | None = None) -> str:
    """``(2, "circle", "red")`` -> ``"two red circles"``; ``(1, "triangle")`` -> ``"a triangle"``"""
    noun = kind if count == 1 else plural(kind)
    words = [NUMBER_WORDS[count]] + ([color] if color else []) + [noun]
    return " ".join(words)


def plural(kind: str) -> str:
    return f"{kind}s"


def join_phrases(phrases: Sequence[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"``."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return f"{', '.join(phrases[:-1])} and {phrases[-1]}"
