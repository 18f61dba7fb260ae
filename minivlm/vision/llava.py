"""LLaVA-1.5's image preprocessing (transformers ``LlavaImageProcessor``, torchvision backend).

1. with ``pad_to_square`` (LLaVA-1.5's ``expand2square``, ``do_pad`` in transformers): pad the
   short side, centred, with the mean colour ``int(mean * 255)``;
2. resize the shortest edge to ``shortest_edge`` (bicubic, antialiased, on uint8), the long edge
   ``int(shortest_edge * long / short)``;
3. centre-crop ``image_size x image_size`` (padding with zeros if smaller);
4. rescale and normalise with CLIP's mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torchvision.transforms.v2 import functional as tvF

from minivlm.vision import hf_ops
from minivlm.vision.io import DEFAULT_MAX_PIXELS
from minivlm.vision.transforms import CLIP_MEAN, CLIP_STD, ProcessedImage


@dataclass
class LlavaImageConfig:
    kind: ClassVar[str] = "llava"
    image_size: int = 336  # crop_size
    shortest_edge: int = 336
    pad_to_square: bool = True
    resample: str = "bicubic"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        hf_ops.check_positive_ints(self, "image_size", "shortest_edge")
        hf_ops.check_resample("LlavaImageConfig.resample", self.resample)
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)


class LlavaImageProcessor(hf_ops.ConfiguredImageProcessor):
    """``image -> ProcessedImage`` with one view."""

    config_class = LlavaImageConfig


    def frame(self, image: Any) -> torch.Tensor:
        """``[1, 3, S, S]``: the one view of ``image``."""
        c = self.config
        pixels = hf_ops.load_uint8(image, c.max_pixels)
        if c.pad_to_square:
            pixels = pad_to_square(pixels, tuple(int(x * 255) for x in c.image_mean))
        height, width = pixels.shape[-2:]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = c.shortest_edge, int(c.shortest_edge * long / short)
        size = (new_long, new_short) if width <= height else (new_short, new_long)
        pixels = center_crop(hf_ops.resize(pixels, *size, c.resample), c.image_size)
        return hf_ops.rescale_and_normalize(pixels[None], c.image_mean, c.image_std)

    def __call__(self, image: Any) -> ProcessedImage:
        return ProcessedImage(self.frame(image), 0, 0)


def pad_to_square(pixels: torch.Tensor, fill: tuple[int, ...]) -> torch.Tensor:
    """``[C, H, W]`` padded to ``[C, L, L]``, ``L = max(H, W)``, the image centred (left/top get the floor)."""
    height, width = pixels.shape[-2:]
    if height == width:
        return pixels
    side = max(height, width)
    left, top = (side - width) // 2, (side - height) // 2
    return tvF.pad(pixels, padding=[left, top, side - width - left, side - height - top], fill=list(fill))


def center_crop(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size x size`` of ``[C, H, W]`` (``TorchvisionBackend.center_crop``)."""
    height, width = pixels.shape[-2:]
    if size > width or size > height:
        pad = [(size - width) // 2 if size > width else 0, (size - height) // 2 if size > height else 0,
               (size - width + 1) // 2 if size > width else 0, (size - height + 1) // 2 if size > height else 0]
        pixels = tvF.pad(pixels, pad, fill=0)
        height, width = pixels.shape[-2:]
        if (height, width) == (size, size):
            return pixels
    top, left = int((height - size) / 2.0), int((width - size) / 2.0)
    return pixels[..., top:top + size, left:left + size]
