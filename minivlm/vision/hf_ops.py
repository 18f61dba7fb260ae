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


def check_positive_ints(config: Any, *names: str) -> None:
    """Each named field of a config dataclass is a positive int (``ValueError`` naming it otherwise)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive int; got {value!r}")


class ConfiguredImageProcessor:
    """What every published-model image processor shares: a config dataclass (``config_class``,
    with a ``kind``), saved as ``{"kind": ..., **fields}`` and restored from it."""

    config_class: type

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_class()

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"kind": self.config.kind, **asdict(self.config)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """``cls(config_class(**data))`` (a ``kind`` key dropped), naming unknown keys."""
        from dataclasses import fields

        data = {k: v for k, v in data.items() if k != "kind"}
        known = {f.name for f in fields(cls.config_class)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.config_class.__name__} keys {unknown}; expected a subset of {sorted(known)}")
        return cls(cls.config_class(**data))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
