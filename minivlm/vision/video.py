"""Load a short video as a handful of uniformly sampled, timestamped RGB frames.

A VLM sees a video as a few still frames with their times written as text before each one
(``"00:03 <image>"``), the recipe of SmolVLM2 and Qwen2-VL-style video chat. Sources:

* a **directory of frame images**, in natural order (``frame2`` before ``frame10``), timed at
  ``fps`` (default 1 frame per second);
* an **animated GIF or WebP** (path or bytes), timed by each frame's own duration;
* a **list or tuple** of anything :func:`~minivlm.vision.io.load_image` accepts, timed at ``fps``;
* an **MP4** (or another container) file or MP4 bytes, decoded with PyAV when the optional ``av``
  package is installed.

Only the sampled frames are decoded to RGB, so a directory of 10,000 frames costs
``max_frames`` image loads.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from minivlm.vision.io import (
    DEFAULT_MAX_PIXELS,
    PIL_DECODE_ERRORS,
    ImageLoadError,
    check_pixel_limit,
    describe_source,
    load_image,
    pillow_bomb_guard,
)

logger = logging.getLogger(__name__)

#: File suffixes decoded with PyAV rather than Pillow.
VIDEO_CONTAINER_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")

# Browsers render GIF frames with a 0 (or missing) delay at 100 ms; we follow them so such
# frames still get increasing timestamps.
_DEFAULT_ANIMATION_FRAME_SECONDS = 0.1
_DEFAULT_FPS = 1.0


class VideoLoadError(ValueError):
    """A video source could not be loaded (empty, unsupported, or missing its decoder)."""


@dataclass
class VideoClip:
    """Sampled frames of a video.

    Attributes:
        frames: RGB images in temporal order.
        timestamps: presentation time of each frame in seconds, strictly increasing.
    """

    frames: list[Image.Image]
    timestamps: list[float]

    def __len__(self) -> int:
        return len(self.frames)


def sample_frame_indices(n_frames: int, max_frames: int) -> list[int]:
    """Uniformly spread ``min(n_frames, max_frames)`` indices over ``range(n_frames)``.

    The first frame is always included and, for two or more samples, the last one too; the
    indices are strictly increasing. Index ``i`` of ``k`` samples is
    ``round_half_up(i * (n_frames - 1) / (k - 1))``, computed in integers: the step is at least
    1 when ``k <= n_frames``, and half-up rounding (unlike Python's half-to-even ``round``)
    keeps consecutive indices distinct.
    """
    if isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 1:
        raise ValueError(f"n_frames must be a positive int, got {n_frames!r}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(f"max_frames must be a positive int, got {max_frames!r}")
    count = min(n_frames, max_frames)
    if count == 1:
        return [0]
    span, steps = n_frames - 1, count - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(count)]


def format_timestamp(seconds: float) -> str:
    """Clock time of a frame as shown to the model: ``"mm:ss"``, or ``"h:mm:ss"`` from one hour.

    Seconds are truncated like a video player's clock (2.9 s shows as ``"00:02"``).
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"timestamp must be a finite number of seconds >= 0, got {seconds!r}")
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes:02d}:{secs:02d}"


def natural_sort_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders digit runs by value: ``frame2`` before ``frame10``, case-insensitive."""
    # re.split with a capture group alternates text, number, text, ..., so positions compare
    # str with str and int with int.
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name))


def load_video(
    src: Any,
    *,
    max_frames: int = 8,
    fps: float | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> VideoClip:
    """Load up to ``max_frames`` uniformly sampled frames of ``src`` (see the module docstring).

    Args:
        src: a directory of frame images, an animated GIF/WebP path or bytes, an MP4 path or
            bytes (needs PyAV), or a list/tuple of images.
        max_frames: at most this many frames are returned, chosen by :func:`sample_frame_indices`.
        fps: frame rate of untimed sources (directory, list): frame ``i`` is at ``i / fps``
            seconds; default 1.0. For animations it only times frames without a duration
            (default 0.1 s each, as browsers do). Container videos use their own timestamps.
        max_pixels: per-frame decompression-bomb limit, see :func:`~minivlm.vision.io.load_image`.

    Raises:
        VideoLoadError: no frames, an unsupported source, or an MP4 without PyAV installed.
        ImageLoadError: a frame could not be loaded.
    """
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(f"max_frames must be a positive int, got {max_frames!r}")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number or None, got {fps!r}")
    if isinstance(src, (list, tuple)):
        return _load_timed_by_fps(list(src), "frame list", max_frames, fps, max_pixels)
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if os.path.isdir(path):
            frame_paths = _frame_files(path)
            return _load_timed_by_fps(
                frame_paths, f"frame directory {path!r}", max_frames, fps, max_pixels
            )
        if not os.path.exists(path):
            raise VideoLoadError(f"video file {path!r}: no such file or directory")
        if path.lower().endswith(VIDEO_CONTAINER_SUFFIXES):
            return _load_container(path, f"video file {path!r}", max_frames, max_pixels)
        return _load_animation(path, f"video file {path!r}", max_frames, fps, max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        source = f"encoded video ({len(data)} bytes)"
        # ISO base media files (MP4, MOV, M4V) start with a box whose type at offset 4 is "ftyp".
        if data[4:8] == b"ftyp":
            return _load_container(io.BytesIO(data), source, max_frames, max_pixels)
        return _load_animation(io.BytesIO(data), source, max_frames, fps, max_pixels)
    raise VideoLoadError(
        f"{describe_source(src)}: unsupported video source; expected a directory of frames, an "
        f"animated GIF/WebP or MP4 path or bytes, or a list of images"
    )


def _frame_files(directory: str) -> list[str]:
    """Image files of ``directory`` (by Pillow's known suffixes), in natural order.

    Hidden files (``.DS_Store``, ``._frame1.png`` left by macOS) are skipped.
    """
    image_suffixes = {suffix.lower() for suffix in Image.registered_extensions()}
    names = [
        name
        for name in os.listdir(directory)
        if not name.startswith(".")
        and os.path.splitext(name)[1].lower() in image_suffixes
        and os.path.isfile(os.path.join(directory, name))
    ]
    return [os.path.join(directory, name) for name in sorted(names, key=natural_sort_key)]


def _load_timed_by_fps(
    items: Sequence[Any], source: str, max_frames: int, fps: float | None, max_pixels: int | None
) -> VideoClip:
    if not items:
        raise VideoLoadError(f"{source}: contains no frames")
    rate = fps if fps is not None else _DEFAULT_FPS
    indices = sample_frame_indices(len(items), max_frames)
    logger.debug("%s: sampling frames %s of %d", source, indices, len(items))
    frames = [load_image(items[index], max_pixels=max_pixels) for index in indices]
    return VideoClip(frames=frames, timestamps=[index / rate for index in indices])


def _load_animation(
    fp: str | io.BytesIO, source: str, max_frames: int, fps: float | None, max_pixels: int | None
) -> VideoClip:
    """Animated GIF/WebP/APNG (a still image is a one-frame video), timed by frame durations."""
    default_ms = 1000.0 / fps if fps is not None else 1000.0 * _DEFAULT_ANIMATION_FRAME_SECONDS
    with pillow_bomb_guard(max_pixels, source):
        try:
            image = Image.open(fp)
        except UnidentifiedImageError as error:
            raise VideoLoadError(
                f"{source}: not a recognised image or animation format; MP4 and other containers "
                f"need a {'/'.join(VIDEO_CONTAINER_SUFFIXES)} suffix or MP4 bytes"
            ) from error
        except PIL_DECODE_ERRORS as error:
            raise VideoLoadError(f"{source}: cannot be read ({error!r})") from error
        with image:
            check_pixel_limit(image.size, max_pixels, source)
            n_frames = _count_frames(image, source)
            # Durations live in each frame's info, so every frame is visited; only the sampled
            # ones are converted to RGB.
            starts: list[float] = []
            # Summed in milliseconds, the unit of the files, so 100 + 200 ms reads as 0.3 s.
            clock_ms = 0.0
            for index in range(n_frames):
                _seek(image, index, source)
                starts.append(clock_ms / 1000.0)
                if "duration" not in image.info:
                    # GIF and APNG read the duration while seeking; WebP only when the frame
                    # is decoded.
                    _decode_frame(image, index, source)
                duration_ms = image.info.get("duration") or 0
                clock_ms += duration_ms if duration_ms > 0 else default_ms
            indices = sample_frame_indices(n_frames, max_frames)
            logger.debug("%s: sampling frames %s of %d", source, indices, n_frames)
            frames = []
            for index in indices:
                _seek(image, index, source)
                # Decoding here reports a corrupt frame by file and frame number.
                _decode_frame(image, index, source)
                frames.append(load_image(image, max_pixels=max_pixels))
    return VideoClip(frames=frames, timestamps=[starts[index] for index in indices])


def _count_frames(image: Image.Image, source: str) -> int:
    try:
        return getattr(image, "n_frames", 1)
    except PIL_DECODE_ERRORS as error:
        raise ImageLoadError(f"{source}: corrupt or truncated animation ({error!r})") from error


def _seek(image: Image.Image, index: int, source: str) -> None:
    try:
        image.seek(index)
    except PIL_DECODE_ERRORS as error:
        raise ImageLoadError(f"{source}: cannot decode frame {index} ({error!r})") from error


def _decode_frame(image: Image.Image, index: int, source: str) -> None:
    try:
        image.load()
    except PIL_DECODE_ERRORS as error:
        raise ImageLoadError(f"{source}: cannot decode frame {index} ({error!r})") from error


def _load_container(
    fp: str | io.BytesIO, source: str, max_frames: int, max_pixels: int | None
) -> VideoClip:
    """Decode a container video (MP4, ...) with PyAV.

    The frame count is only known reliably after decoding (container headers may omit or
    misstate it), so the video is decoded twice: once for the timestamps, once keeping only the
    sampled frames. This holds at most ``max_frames`` RGB frames in memory.
    """
    av = _import_pyav(source)
    times = [seconds for seconds, _ in _container_frames(av, fp, source, max_pixels)]
    if not times:
        raise VideoLoadError(f"{source}: contains no video frames")
    indices = sample_frame_indices(len(times), max_frames)
    logger.debug("%s: sampling frames %s of %d", source, indices, len(times))
    wanted = set(indices)
    frames = [
        load_image(frame.to_image(), max_pixels=max_pixels)
        for index, (_, frame) in enumerate(_container_frames(av, fp, source, max_pixels))
        if index in wanted
    ]
    # Clips cut from a stream can start at a non-zero presentation time; the model should see
    # time since the clip began, like the other sources.
    start = times[0]
    return VideoClip(frames=frames, timestamps=[times[index] - start for index in indices])


def _import_pyav(source: str) -> Any:
    """Import the optional PyAV package, or explain how to get it."""
    if importlib.util.find_spec("av") is None:
        raise VideoLoadError(
            f"{source}: decoding MP4 and other container videos needs PyAV, which is not "
            f"installed; run `pip install av`, or pass a directory of frame images, an animated "
            f"GIF/WebP, or a list of images instead"
        )
    return importlib.import_module("av")


def _container_frames(
    av: Any, fp: str | io.BytesIO, source: str, max_pixels: int | None
) -> Iterator[tuple[float, Any]]:
    """Yield ``(seconds, av.VideoFrame)`` for every frame of the first video stream."""
    if isinstance(fp, io.BytesIO):
        fp.seek(0)
    try:
        container = av.open(fp)
    except (OSError, ValueError, av.FFmpegError) as error:
        raise VideoLoadError(f"{source}: cannot be opened as a video ({error})") from error
    with container:
        if not container.streams.video:
            raise VideoLoadError(f"{source}: has no video stream")
        stream = container.streams.video[0]
        check_pixel_limit(
            (stream.codec_context.width, stream.codec_context.height), max_pixels, source
        )
        rate = float(stream.average_rate) if stream.average_rate else _DEFAULT_FPS
        try:
            for index, frame in enumerate(container.decode(stream)):
                # Frames without a presentation time fall back to the stream's nominal rate.
                seconds = float(frame.time) if frame.time is not None else index / rate
                yield seconds, frame
        except (OSError, ValueError, av.FFmpegError) as error:
            raise VideoLoadError(f"{source}: corrupt video data ({error})") from error
