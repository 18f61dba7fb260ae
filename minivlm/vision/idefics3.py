"""Idefics3 / SmolVLM image splitting (transformers ``Idefics3ImageProcessor``, torchvision backend).

For one image (``uint8`` throughout, each resize rounding to uint8 as transformers does):

1. resize so the longest edge is ``longest_edge`` (up or down; the other edge keeps the aspect
   ratio, truncated and rounded up to even), capped at 4096;
2. with ``split_image``: resize both edges up to multiples of the tile size ``image_size``
   (``resize_for_vision_encoder``); if that is larger than one tile, cut ``rows x cols`` tiles
   row by row and append the global view (the resized image squashed to one tile); otherwise the
   image is one unsplit view. Without splitting: squash to one tile;
3. rescale and normalise with ``image_mean`` / ``image_std`` (SigLIP's 0.5 / 0.5 by default).

Resampling is Lanczos (torchvision >= 0.27 on the CPU, as transformers uses it there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from minivlm.vision import hf_ops
from minivlm.vision.io import DEFAULT_MAX_PIXELS
from minivlm.vision.transforms import ProcessedImage

MAX_IMAGE_SIZE = 4096


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """``_resize_output_size_rescale_to_max_len`` then ``_resize_output_size_scale_below_upper_bound``."""
    aspect = width / height
    if width >= height:
        width, height = longest_edge, int(longest_edge / aspect)
        height += height % 2
    else:
        height, width = longest_edge, int(longest_edge * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """``resize_for_vision_encoder``: both edges rounded up to multiples of ``tile``."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


@dataclass
class Idefics3ImageConfig:
    """``image_size``: the tile side (``max_image_size["longest_edge"]``, the encoder's input);
    ``longest_edge``: the first resize (``size["longest_edge"]``); ``video_longest_edge``: video
    frames are resized to this longest edge, then squashed to one tile (``SmolVLMVideoProcessor``;
    None: ``image_size``)."""

    kind: ClassVar[str] = "idefics3"
    image_size: int = 364
    longest_edge: int = 4 * 364
    split_image: bool = True
    resample: str = "lanczos"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    video_longest_edge: int | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        hf_ops.check_positive_ints(self, "image_size", "longest_edge")
        hf_ops.check_resample("Idefics3ImageConfig.resample", self.resample)
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)


class Idefics3ImageProcessor(hf_ops.ConfiguredImageProcessor):
    """``image -> ProcessedImage`` (tiles row-major, then the global view)."""

    config_class = Idefics3ImageConfig


    def __call__(self, image: Any) -> ProcessedImage:
        c = self.config
        pixels = hf_ops.load_uint8(image, c.max_pixels)
        pixels = hf_ops.resize(pixels, *longest_edge_size(*pixels.shape[-2:], c.longest_edge), c.resample)
        tile = c.image_size
        rows = cols = 0
        if c.split_image:
            pixels = hf_ops.resize(pixels, *tile_multiple_size(*pixels.shape[-2:], tile), c.resample)
            height, width = pixels.shape[-2:]
            if height > tile or width > tile:
                rows, cols = height // tile, width // tile
                tiles = pixels.unfold(1, tile, tile).unfold(2, tile, tile)  # [3, rows, cols, tile, tile]
                tiles = tiles.permute(1, 2, 0, 3, 4).reshape(rows * cols, 3, tile, tile)
                views = torch.cat([tiles, hf_ops.resize(pixels, tile, tile, c.resample)[None]])
            else:
                views = pixels[None]
        else:
            views = hf_ops.resize(pixels, tile, tile, c.resample)[None]
        return ProcessedImage(hf_ops.rescale_and_normalize(views, c.image_mean, c.image_std), rows, cols)

    def frame(self, image: Any) -> torch.Tensor:
        """One video frame as ``[1, 3, S, S]`` (resized to ``video_longest_edge``, then squashed)."""
        c = self.config
        pixels = hf_ops.load_uint8(image, c.max_pixels)
        pixels = hf_ops.resize(pixels, *longest_edge_size(*pixels.shape[-2:], c.video_longest_edge or c.image_size),
                               c.resample)
        pixels = hf_ops.resize(pixels, c.image_size, c.image_size, c.resample)
        return hf_ops.rescale_and_normalize(pixels[None], c.image_mean, c.image_std)
