"""Image operations exactly as transformers' torchvision-backed image processors compute them.

Pixel-exact parity with a published model's processor needs its arithmetic, not just its idea:
resizing runs on ``uint8`` ``[C, H, W]`` tensors through ``torchvision.transforms.v2.functional``
with antialiasing (so every resize rounds to uint8, as there), and rescale + normalise are fused
as ``(x - mean * 255) / (std * 255)`` in float32 (``TorchvisionBackend.rescale_and_normalize``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

from minivlm.vision.io import DEFAULT_MAX_PIXELS, load_image

RESAMPLE = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
            "bicubic": InterpolationMode.BICUBIC, "lanczos": InterpolationMode.LANCZOS}


def load_uint8(image: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Anything :func:`~minivlm.vision.io.load_image` reads, as an RGB ``uint8 [3, H, W]`` tensor."""
    rgb = load_image(image, max_pixels=max_pixels)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def resize(image: torch.Tensor, height: int, width: int, resample: str) -> torch.Tensor:
    """``[..., C, H, W]`` uint8 -> ``[..., C, height, width]`` (antialiased, as transformers)."""
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE)}; got {resample!r}")
    return tvF.resize(image, [height, width], interpolation=RESAMPLE[resample], antialias=True)


def rescale_and_normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` -> float32 ``(x / 255 - mean) / std``, fused as transformers fuses it."""
    mean_255 = torch.tensor(mean) * (1.0 / (1 / 255))
    std_255 = torch.tensor(std) * (1.0 / (1 / 255))
    return tvF.normalize(images.to(torch.float32), mean_255.tolist(), std_255.tolist())


def check_resample(name: str, value: str) -> None:
    if value not in RESAMPLE:
        raise ValueError(f"{name} must be one of {sorted(RESAMPLE)}; got {value!r}")
