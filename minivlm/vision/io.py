"""Load any image-like input as a fully decoded RGB :class:`PIL.Image.Image`.

Every image that enters minivlm goes through :func:`load_image`, so the rest of the pipeline can
assume one thing: an RGB, 8-bit, upright image whose pixels are already in memory. The
conversions follow what a person looking at the file would expect rather than what a bare
``Image.convert("RGB")`` does:

* **Transparency** (RGBA, LA, palette images with a transparent index) is composited on *white*,
  as a browser or document viewer shows it. ``convert("RGB")`` would instead drop the alpha
  channel and expose whatever colour the invisible pixels happen to store (often black).
* **16-bit greyscale** (``I;16*`` and ``I``, which is how Pillow stores 16-bit PNG/TIFF data) is
  scaled by ``255 / 65535``. ``convert("L")`` clips instead, turning almost every 16-bit
  photograph white.
* **EXIF orientation** is applied (:func:`PIL.ImageOps.exif_transpose`), so phone photos are
  upright.
* **Decompression bombs** are refused from the header size, before any pixel is decoded: a tiny
  PNG can declare a 100k x 100k canvas and exhaust memory when decoded.

Every failure raises :class:`ImageLoadError` (a :class:`ValueError`) naming the source.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

#: Pillow's own default limit (``PIL.Image.MAX_IMAGE_PIXELS``): about 0.25 GiB of 24-bit pixels.
DEFAULT_MAX_PIXELS = 89_478_485

#: Modes whose alpha channel is composited on white; pre-multiplied modes are first brought back
#: to straight alpha by Pillow's own conversion.
_ALPHA_MODES_TO_RGBA = {"RGBA": "RGBA", "RGBa": "RGBA", "LA": "RGBA", "La": "LA", "PA": "RGBA"}
_KEYED_TRANSPARENCY_MODES = {"P", "L", "RGB"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_UINT16_TO_UINT8 = 255.0 / 65535.0

#: What Pillow raises on truncated or malformed data: OSError for truncation, and whatever a
#: format parser hits when it reads past the end of a cut file or parses garbage (the same set
#: ``Image.open`` itself catches from its plugins, plus ValueError and EOFError).
PIL_DECODE_ERRORS = (
    OSError,
    EOFError,
    SyntaxError,
    ValueError,
    IndexError,
    TypeError,
    struct.error,
)

# Serialises the rare calls that must switch Pillow's process-wide bomb check off; re-entrant
# because video loading decodes frames inside such a block.
_PIL_LIMIT_LOCK = threading.RLock()


class ImageLoadError(ValueError):
    """An input could not be loaded as an image (missing, corrupt, too large, or unsupported)."""


@contextmanager
def pillow_bomb_guard(max_pixels: int | None, source: str) -> Iterator[None]:
    """Let ``max_pixels``, not Pillow's global limit, decide which images are too large.

    Pillow checks ``Image.MAX_IMAGE_PIXELS`` itself inside ``Image.open`` and frame seeks: it
    warns above that limit and raises ``DecompressionBombError`` above twice it. Callers do
    their own check (:func:`check_pixel_limit`) on the header size, so:

    * when ``max_pixels`` is within Pillow's limit (the default), nothing changes: anything
      Pillow objects to is over ``max_pixels`` as well, and its error is re-raised as
      :class:`ImageLoadError`. No lock is taken, so decoding in threads stays parallel;
    * when ``max_pixels`` is looser (or None), Pillow's check is switched off for the block,
      under a lock because the setting is process-wide. Other threads decoding through this
      module wait meanwhile; threads calling Pillow directly are not covered by Pillow's check
      for that time.
    """
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is not None and max_pixels is not None and max_pixels <= pillow_limit:
        try:
            yield
        except Image.DecompressionBombError as error:
            raise ImageLoadError(
                f"{source}: image is over the limit of max_pixels={max_pixels:,} (refused as a "
                f"possible decompression bomb; Pillow: {error})"
            ) from error
        return
    with _PIL_LIMIT_LOCK:
        previous_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous_limit


def check_pixel_limit(size: tuple[int, int], max_pixels: int | None, source: str) -> None:
    """Raise :class:`ImageLoadError` if ``width * height > max_pixels`` (None: no limit)."""
    if max_pixels is None:
        return
    width, height = size
    if width * height > max_pixels:
        raise ImageLoadError(
            f"{source}: image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"max_pixels={max_pixels:,} (refused as a possible decompression bomb); pass a larger "
            f"max_pixels, or max_pixels=None, if the image is trusted"
        )


def describe_source(src: Any) -> str:
    """Short human-readable name of an image source, used in error messages."""
    if isinstance(src, (str, os.PathLike)):
        return f"image file {os.fspath(src)!r}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"encoded image ({len(src)} bytes)"
    if isinstance(src, Image.Image):
        return f"PIL image (mode {src.mode}, size {src.size})"
    if isinstance(src, np.ndarray):
        return f"numpy array (shape {src.shape}, dtype {src.dtype})"
    if isinstance(src, torch.Tensor):
        return f"torch tensor (shape {tuple(src.shape)}, dtype {src.dtype})"
    return f"object of type {type(src).__name__}"


def load_image(src: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load ``src`` as an upright, fully decoded RGB image.

    Args:
        src: one of
            * ``str`` / ``os.PathLike``: path of an image file Pillow can read;
            * ``bytes`` / ``bytearray`` / ``memoryview``: the encoded file contents;
            * :class:`PIL.Image.Image` of any mode (not modified; a new image is returned);
            * ``numpy.ndarray`` ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` (RGBA) of
              dtype uint8, uint16 (scaled by 255/65535), bool (False=0, True=255) or float in
              ``[0, 1]``;
            * ``torch.Tensor`` ``[C, H, W]`` or ``[H, W, C]`` with C in {1, 3, 4}, or ``[H, W]``,
              same dtypes. A shape that fits both layouts (``[3, H, 3]``) is read as ``[C, H, W]``,
              PyTorch's convention.
        max_pixels: refuse images with ``width * height > max_pixels`` (checked on the header,
            before decoding); ``None`` disables the check.

    Returns:
        An RGB :class:`PIL.Image.Image` with its pixels loaded.

    Raises:
        ImageLoadError: the file is missing, unreadable, corrupt or truncated, the type, shape
            or dtype is unsupported, or the image is larger than ``max_pixels``.
    """
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    source = describe_source(src)
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.exists(path):
            raise ImageLoadError(f"{source}: no such file")
        if os.path.isdir(path):
            raise ImageLoadError(f"{source}: is a directory, expected an image file")
        return _decode(path, source, max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageLoadError(f"{source}: empty input")
        return _decode(io.BytesIO(bytes(src)), source, max_pixels)
    if isinstance(src, Image.Image):
        return _finish(src, source, max_pixels)
    if isinstance(src, torch.Tensor):
        return _finish(
            _array_to_image(_tensor_to_hwc_array(src, source), source), source, max_pixels
        )
    if isinstance(src, np.ndarray):
        return _finish(_array_to_image(src, source), source, max_pixels)
    raise ImageLoadError(
        f"{source}: unsupported image source; expected a file path, encoded bytes, a PIL image, "
        f"a numpy array or a torch tensor"
    )


def _decode(fp: str | io.BytesIO, source: str, max_pixels: int | None) -> Image.Image:
    """Open an encoded image (header only), check its size, then decode it."""
    with pillow_bomb_guard(max_pixels, source):
        try:
            image = Image.open(fp)
        except UnidentifiedImageError as error:
            raise ImageLoadError(f"{source}: not a recognised image format ({error})") from error
        except PIL_DECODE_ERRORS as error:
            raise ImageLoadError(f"{source}: cannot be read ({error!r})") from error
        with image:
            return _finish(image, source, max_pixels)


def _finish(image: Image.Image, source: str, max_pixels: int | None) -> Image.Image:
    """Size check, pixel decode, EXIF orientation and RGB conversion of an opened image."""
    check_pixel_limit(image.size, max_pixels, source)
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(f"{source}: image has zero size {image.size}")
    try:
        # A lazily opened file decodes here, so this is where truncated or corrupt data shows.
        image.load()
        upright = ImageOps.exif_transpose(image)
    except PIL_DECODE_ERRORS as error:
        raise ImageLoadError(f"{source}: corrupt or truncated image data ({error!r})") from error
    rgb = to_rgb(upright, source)
    # exif_transpose and convert already return new images; the explicit copy covers an RGB
    # input with no orientation tag, so the caller's image is never aliased.
    return rgb.copy() if rgb is image else rgb


def to_rgb(image: Image.Image, source: str = "image") -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit RGB (see the module docstring)."""
    mode = image.mode
    if mode in _KEYED_TRANSPARENCY_MODES and "transparency" in image.info:
        # A transparent palette index (GIF, PNG-8) or a PNG tRNS colour key.
        return _composite_on_white(image.convert("RGBA"))
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES_TO_RGBA:
        straight = image.convert(_ALPHA_MODES_TO_RGBA[mode])
        return _composite_on_white(straight.convert("RGBA"))
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        if mode == "I" and (values.min() < 0 or values.max() > 65535):
            logger.debug("%s: 32-bit mode I values outside [0, 65535] are clipped", source)
        grey = np.clip(np.rint(np.clip(values, 0, 65535) * _UINT16_TO_UINT8), 0, 255)
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if mode == "F":
        # Pillow's float mode shares the 0..255 scale of "L" (``Image.convert("F")`` of an 8-bit
        # image keeps its values); numpy float arrays use [0, 1] instead, see _array_to_image.
        grey = np.clip(np.rint(np.nan_to_num(np.asarray(image, dtype=np.float64))), 0, 255)
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ImageLoadError(f"{source}: cannot convert mode {mode!r} to RGB ({error})") from error


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _tensor_to_hwc_array(tensor: torch.Tensor, source: str) -> np.ndarray:
    """``[C, H, W]`` / ``[H, W, C]`` / ``[H, W]`` tensor -> ``[H, W(, C)]`` numpy array."""
    values = tensor.detach().cpu()
    if values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()  # numpy has no bfloat16; float32 holds both exactly
    if values.dim() == 3:
        channels_first = values.shape[0] in (1, 3, 4)
        channels_last = values.shape[-1] in (1, 3, 4)
        if channels_first:
            values = values.permute(1, 2, 0)
        elif not channels_last:
            raise ImageLoadError(
                f"{source}: expected [C, H, W] or [H, W, C] with C in (1, 3, 4), got shape "
                f"{tuple(tensor.shape)}"
            )
    elif values.dim() != 2:
        raise ImageLoadError(
            f"{source}: expected a 2-D [H, W] or 3-D [C, H, W] / [H, W, C] tensor, got "
            f"{values.dim()} dimensions"
        )
    try:
        return values.contiguous().numpy()
    except TypeError as error:
        raise ImageLoadError(f"{source}: unsupported tensor dtype {tensor.dtype}") from error


def _array_to_image(array: np.ndarray, source: str) -> Image.Image:
    """``[H, W]`` / ``[H, W, 1|3|4]`` array -> 8-bit L, RGB or RGBA image.

    The dtype rules are those listed in :func:`load_image`.
    """
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ImageLoadError(
            f"{source}: expected shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (channels last), "
            f"got {array.shape}"
        )
    if array.size == 0:
        raise ImageLoadError(f"{source}: array is empty")
    # Compare kind and size rather than dtypes: a big-endian uint16 (">u2", as read from
    # FITS or some TIFF tools) is not == np.uint16 on a little-endian machine.
    kind, itemsize = array.dtype.kind, array.dtype.itemsize
    if kind == "u" and itemsize == 1:
        pixels = array
    elif kind == "b":
        pixels = array.astype(np.uint8) * 255
    elif kind == "u" and itemsize == 2:
        pixels = np.rint(array.astype(np.float64) * _UINT16_TO_UINT8).astype(np.uint8)
    elif kind == "f":
        if not np.isfinite(array).all():
            raise ImageLoadError(f"{source}: float image contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ImageLoadError(
                f"{source}: float images must have values in [0, 1], got range [{low:.4g}, "
                f"{high:.4g}]; scale the values (e.g. divide by 255) first"
            )
        pixels = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ImageLoadError(
            f"{source}: unsupported dtype {array.dtype}; expected uint8, uint16, bool or float "
            f"in [0, 1]"
        )
    # Pillow infers the mode from a uint8 array's shape: [H, W] -> L, [H, W, 3] -> RGB,
    # [H, W, 4] -> RGBA (whose alpha to_rgb then composites on white).
    return Image.fromarray(np.ascontiguousarray(pixels))
