"""nanoVLM's image preprocessing (huggingface/nanoVLM ``data/custom_transforms.py``).

1. ``DynamicResize``: the long side becomes ``min(max_side, ceil(long / tile) * tile)`` (or
   ``max_side`` with ``resize_to_max_side``), the short side ``ceil(short * scale / tile) * tile``;
   Pillow bicubic (torchvision's ``resize`` on a PIL image);
2. ``ToTensor``: float ``[0, 1]``, no normalisation;
3. ``GlobalAndSplitImages``: tiles of ``tile x tile`` row by row, with the global view (the image
   resized to one tile, bilinear, antialiased, on the float tensor) *first*; a single-tile image
   is that one tile alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvF1

from minivlm.vision import hf_ops
from minivlm.vision.io import DEFAULT_MAX_PIXELS, load_image
from minivlm.vision.transforms import ProcessedImage


@dataclass
class NanoVLMImageConfig:
    kind: ClassVar[str] = "nanovlm"
    image_size: int = 512  # vit_img_size: the tile side
    max_side: int = 2048  # max_img_size
    resize_to_max_side: bool = True  # resize_to_max_side_len
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        hf_ops.check_positive_ints(self, "image_size", "max_side")


def dynamic_resize_size(height: int, width: int, tile: int, max_side: int, to_max_side: bool) -> tuple[int, int]:
    """``DynamicResize._get_new_hw``: ``(new_h, new_w)``, both multiples of ``tile``."""
    long, short = (width, height) if width >= height else (height, width)
    target_long = max_side if to_max_side else min(max_side, math.ceil(long / tile) * tile)
    target_short = max(math.ceil(short * (target_long / long) / tile) * tile, tile)
    return (target_short, target_long) if width >= height else (target_long, target_short)


class NanoVLMImageProcessor(hf_ops.ConfiguredImageProcessor):
    """``image -> ProcessedImage`` (global view first)."""

    config_class = NanoVLMImageConfig


    def __call__(self, image: Any) -> ProcessedImage:
        c = self.config
        rgb = load_image(image, max_pixels=c.max_pixels)
        height, width = dynamic_resize_size(rgb.height, rgb.width, c.image_size, c.max_side, c.resize_to_max_side)
        resized = rgb.resize((width, height), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous().float().div(255)
        tile = c.image_size
        rows, cols = height // tile, width // tile
        tiles = pixels.unfold(1, tile, tile).unfold(2, tile, tile).permute(1, 2, 0, 3, 4).reshape(-1, 3, tile, tile)
        if (rows, cols) == (1, 1):
            return ProcessedImage(tiles, 0, 0)
        global_view = tvF1.resize(pixels[None], [tile, tile], interpolation=InterpolationMode.BILINEAR, antialias=True)
        return ProcessedImage(torch.cat([global_view, tiles]), rows, cols, global_first=True)

    def frame(self, image: Any) -> torch.Tensor:
        """``[1, 3, S, S]``: the global view of ``image`` (nanoVLM has no video format)."""
        processed = self(image)
        return processed.pixel_values[:1]
