"""Turn an image into the normalised square views an image encoder consumes.

:class:`ImageProcessor` does three things, each a config field of :class:`ImageProcessorConfig`:

* **Fit to a square** (``resize``): ``"resize"`` stretches to ``image_size x image_size``
  (what CLIP/SigLIP training pipelines do for most data); ``"letterbox"`` keeps the aspect ratio
  and pads with the normalisation mean, which becomes exactly 0 after normalisation so padding
  carries no signal (LLaVA-1.5's ``expand2square`` pads with the mean colour for the same
  reason); ``"crop"`` resizes the short side and keeps the centre square (OpenAI CLIP's eval
  transform).
* **Normalise** with the statistics the encoder was trained with (``normalization``): CLIP's,
  SigLIP's ``(x - 0.5) / 0.5`` or ImageNet's.
* **Split** large images into tiles plus a global view (``split_image``), the idea of
  Idefics3/SmolVLM (Laurençon et al. 2024, "Building and better understanding vision-language
  models"): the encoder sees every tile at its native resolution and the downscaled whole image
  for context. The grid rule is :func:`choose_tile_grid`, an own implementation rather than a
  port of ``Idefics3ImageProcessor.split_image``.

Resampling uses Pillow, like the Hugging Face image processors, so bicubic downscaling is
antialiased.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image

from minivlm.vision.io import DEFAULT_MAX_PIXELS, load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: name -> (per-channel mean, per-channel std) of RGB values in [0, 1].
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "siglip": (SIGLIP_MEAN, SIGLIP_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}

RESIZE_MODES = ("resize", "letterbox", "crop")

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass
class ImageProcessorConfig:
    """How images are turned into encoder inputs; JSON-serialisable via :func:`dataclasses.asdict`.

    Attributes:
        image_size: side of the square view the encoder sees, in pixels.
        resize: ``"resize"`` (stretch, ignores aspect), ``"letterbox"`` (keep aspect, pad with
            the mean colour) or ``"crop"`` (resize the short side, keep the centre square).
        normalization: key of :data:`NORMALIZATIONS`.
        split_image: also cut the image into ``image_size`` tiles (see :func:`choose_tile_grid`)
            and return them before a global view.
        max_tiles: upper bound on ``rows * cols`` when splitting.
        interpolation: Pillow resampling filter, a key of :data:`INTERPOLATIONS`.
        max_pixels: decompression-bomb limit passed to :func:`~minivlm.vision.io.load_image`
            (None: no limit).
    """

    image_size: int = 64
    resize: str = "resize"
    normalization: str = "clip"
    split_image: bool = False
    max_tiles: int = 4
    interpolation: str = "bicubic"
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        _require_positive_int("image_size", self.image_size)
        _require_positive_int("max_tiles", self.max_tiles)
        if self.max_pixels is not None:
            _require_positive_int("max_pixels", self.max_pixels)
        _require_choice("resize", self.resize, RESIZE_MODES)
        _require_choice("normalization", self.normalization, tuple(NORMALIZATIONS))
        _require_choice("interpolation", self.interpolation, tuple(INTERPOLATIONS))
        if not isinstance(self.split_image, bool):
            raise ValueError(
                f"ImageProcessorConfig.split_image must be a bool, got {self.split_image!r}"
            )


def _require_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ImageProcessorConfig.{name} must be a positive int, got {value!r}")


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ImageProcessorConfig.{name} must be one of {choices}, got {value!r}")


@dataclass
class ProcessedImage:
    """The encoder-ready views of one image.

    Attributes:
        pixel_values: ``[n_views, 3, image_size, image_size]`` float32, normalised. Unsplit:
            one view. Split: the ``rows * cols`` tiles in row-major order, then the global view
            last, so ``n_views = rows * cols + 1``.
        rows: tile grid rows (0 when not split).
        cols: tile grid columns (0 when not split).
        global_first: the global view comes before the tiles (nanoVLM's order) instead of after.
    """

    pixel_values: torch.Tensor
    rows: int
    cols: int
    global_first: bool = False

    @property
    def n_views(self) -> int:
        return self.pixel_values.shape[0]


def choose_tile_grid(width: int, height: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """Pick the ``(rows, cols)`` grid an image of ``width x height`` pixels is split into.

    The rule (in the spirit of Idefics3/SmolVLM image splitting, which resizes the long edge to
    a multiple of the tile size and tiles it):

    1. An image that fits in one tile (``width <= tile_size`` and ``height <= tile_size``)
       gets ``1 x 1``.
    2. Candidates are all grids with ``rows * cols <= max_tiles``,
       ``rows <= ceil(height / tile_size)`` and ``cols <= ceil(width / tile_size)``: never more
       tiles along an axis than it takes to cover that axis at native resolution, so a small
       image is not upsampled into many blurry tiles.
    3. The chosen grid is the candidate whose aspect ratio ``cols / rows`` is closest to
       ``width / height`` in log space (stretching by 2x and squashing by 2x count the same),
       because the image is resized onto the grid and every mismatch distorts it. Ties go to
       more tiles (more resolution), then to fewer rows, so the choice is deterministic.

    Examples with ``tile_size=64, max_tiles=4``: 256x64 -> (1, 4); 64x256 -> (4, 1);
    512x512 -> (2, 2); 1000x500 -> (1, 2); 50x40 -> (1, 1).
    """
    for name, value in (
        ("width", width),
        ("height", height),
        ("tile_size", tile_size),
        ("max_tiles", max_tiles),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"choose_tile_grid: {name} must be a positive int, got {value!r}")
    if width <= tile_size and height <= tile_size:
        return 1, 1
    max_rows = min(max_tiles, math.ceil(height / tile_size))
    max_cols = min(max_tiles, math.ceil(width / tile_size))
    log_aspect = math.log(width / height)
    candidates = [
        (rows, cols)
        for rows in range(1, max_rows + 1)
        for cols in range(1, max_cols + 1)
        if rows * cols <= max_tiles
    ]

    def preference(grid: tuple[int, int]) -> tuple[float, int, int]:
        rows, cols = grid
        # Rounded so grids with the same aspect (1x2, 2x4) tie exactly despite float noise.
        distortion = round(abs(math.log(cols / rows) - log_aspect), 9)
        return distortion, -rows * cols, rows

    return min(candidates, key=preference)


class ImageProcessor:
    """Load, fit, normalise and optionally split images for the image encoder.

    Example::

        processor = ImageProcessor(ImageProcessorConfig(image_size=224, split_image=True))
        out = processor("photo.jpg")          # out.pixel_values: [rows*cols + 1, 3, 224, 224]
    """

    def __init__(self, config: ImageProcessorConfig | None = None) -> None:
        self.config = config if config is not None else ImageProcessorConfig()
        mean, std = NORMALIZATIONS[self.config.normalization]
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._resample = INTERPOLATIONS[self.config.interpolation]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def __call__(self, image: Any) -> ProcessedImage:
        """Process one image (anything :func:`~minivlm.vision.io.load_image` accepts)."""
        rgb = load_image(image, max_pixels=self.config.max_pixels)
        global_view = self._global_view(rgb)  # [3, S, S]
        if not self.config.split_image:
            return ProcessedImage(pixel_values=global_view.unsqueeze(0), rows=0, cols=0)
        size = self.config.image_size
        rows, cols = choose_tile_grid(rgb.width, rgb.height, size, self.config.max_tiles)
        grid = self._normalize(
            self._to_tensor(rgb.resize((cols * size, rows * size), self._resample))
        )
        # [3, rows*S, cols*S] -> [rows, cols, 3, S, S] -> row-major tiles [rows*cols, 3, S, S]
        tiles = (
            grid.view(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(-1, 3, size, size)
        )
        pixel_values = torch.cat([tiles, global_view.unsqueeze(0)], dim=0)
        return ProcessedImage(pixel_values=pixel_values, rows=rows, cols=cols)

    def frame(self, image: Any) -> torch.Tensor:
        """One video frame as a single unsplit view ``[1, 3, S, S]``."""
        rgb = load_image(image, max_pixels=self.config.max_pixels)
        return self._global_view(rgb).unsqueeze(0)

    def unnormalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation: ``[..., 3, H, W]`` -> same shape in ``[0, 1]``, for display."""
        if pixel_values.dim() < 3 or pixel_values.shape[-3] != 3:
            raise ValueError(
                "unnormalize expects [..., 3, H, W] pixel values, got shape "
                f"{tuple(pixel_values.shape)}"
            )
        mean = self._mean.to(pixel_values.device, pixel_values.dtype)
        std = self._std.to(pixel_values.device, pixel_values.dtype)
        return (pixel_values * std + mean).clamp(0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serialisable dict (inverse: :meth:`from_dict`)."""
        return asdict(self.config)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ImageProcessor:
        """Build a processor from :meth:`to_dict` output; unknown keys are an error, not ignored."""
        known = {field.name for field in fields(ImageProcessorConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"unknown ImageProcessorConfig keys {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(ImageProcessorConfig(**config))

    def _global_view(self, image: Image.Image) -> torch.Tensor:
        """The whole image fitted to ``[3, S, S]`` per ``config.resize``, normalised."""
        size = self.config.image_size
        width, height = image.size
        if self.config.resize == "resize":
            return self._normalize(self._to_tensor(image.resize((size, size), self._resample)))
        if self.config.resize == "crop":
            # Resampling the centre square straight from the source (Pillow's ``box``) equals
            # "resize the short side to S, then centre-crop S x S" without an intermediate image.
            side = min(width, height)
            left, top = (width - side) / 2, (height - side) / 2
            box = (left, top, left + side, top + side)
            return self._normalize(
                self._to_tensor(image.resize((size, size), self._resample, box=box))
            )
        # letterbox: the long side becomes S; padding is 0 after normalisation = the mean colour.
        scale = size / max(width, height)
        fitted_width = min(size, max(1, round(width * scale)))
        fitted_height = min(size, max(1, round(height * scale)))
        fitted = self._normalize(
            self._to_tensor(image.resize((fitted_width, fitted_height), self._resample))
        )
        canvas = torch.zeros(3, size, size, dtype=torch.float32)
        top, left = (size - fitted_height) // 2, (size - fitted_width) // 2
        canvas[:, top : top + fitted_height, left : left + fitted_width] = fitted
        return canvas

    @staticmethod
    def _to_tensor(image: Image.Image) -> torch.Tensor:
        """RGB image -> ``[3, H, W]`` float32 in [0, 1]."""
        pixels = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self._mean) / self._std
