"""Images and videos in, encoder-ready tensors out.

* :mod:`minivlm.vision.io`: :func:`load_image` turns paths, bytes, PIL images, arrays and tensors
  into upright RGB images, refusing decompression bombs.
* :mod:`minivlm.vision.transforms`: :class:`ImageProcessor` fits, normalises and optionally
  splits images into tiles plus a global view.
* :mod:`minivlm.vision.video`: :func:`load_video` samples timestamped frames from frame
  directories, animated GIF/WebP, image lists and (with PyAV) MP4.
"""

from __future__ import annotations

from minivlm.vision.io import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from minivlm.vision.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    NORMALIZATIONS,
    RESIZE_MODES,
    SIGLIP_MEAN,
    SIGLIP_STD,
    ImageProcessor,
    ImageProcessorConfig,
    ProcessedImage,
    choose_tile_grid,
)
from minivlm.vision.video import (
    VideoClip,
    VideoLoadError,
    format_timestamp,
    load_video,
    sample_frame_indices,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "NORMALIZATIONS",
    "RESIZE_MODES",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "ImageLoadError",
    "ImageProcessor",
    "ImageProcessorConfig",
    "ProcessedImage",
    "VideoClip",
    "VideoLoadError",
    "choose_tile_grid",
    "format_timestamp",
    "load_image",
    "load_video",
    "sample_frame_indices",
]
