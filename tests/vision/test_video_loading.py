"""load_video: frame directories, animations, image lists, MP4; uniform sampling; timestamps."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, features

from minivlm.vision import (
    ImageLoadError,
    VideoClip,
    VideoLoadError,
    format_timestamp,
    load_video,
    sample_frame_indices,
)

# Distinct, palette-exact colours so a frame's colour tells which source frame it was.
PALETTE = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (0, 255, 255),
    (255, 0, 255),
    (128, 0, 0),
    (0, 128, 0),
    (0, 0, 128),
    (128, 128, 0),
    (0, 128, 128),
    (128, 0, 128),
]


def frame_of(index: int, size: tuple[int, int] = (8, 6)) -> Image.Image:
    return Image.new("RGB", size, PALETTE[index])


def centre_colour(image: Image.Image) -> tuple[int, int, int]:
    return image.getpixel((image.width // 2, image.height // 2))


def frame_indices(clip: VideoClip) -> list[int]:
    """Which PALETTE entry each frame shows (nearest colour, to tolerate lossy codecs)."""
    palette = np.array(PALETTE)
    return [
        int(np.abs(palette - np.array(centre_colour(frame))).sum(axis=1).argmin())
        for frame in clip.frames
    ]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def animation_bytes(durations_ms: list[int], fmt: str = "GIF", **params) -> bytes:
    frames = [frame_of(index) for index in range(len(durations_ms))]
    buffer = io.BytesIO()
    frames[0].save(
        buffer,
        fmt,
        save_all=True,
        append_images=frames[1:],
        duration=durations_ms,
        loop=0,
        **params,
    )
    return buffer.getvalue()


# --- sampling -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_frames, max_frames, expected",
    [
        (1, 8, [0]),
        (5, 1, [0]),
        (5, 2, [0, 4]),
        (5, 8, [0, 1, 2, 3, 4]),
        (12, 4, [0, 4, 7, 11]),
        (100, 5, [0, 25, 50, 74, 99]),
    ],
)
def test_sample_frame_indices_examples(n_frames: int, max_frames: int, expected: list[int]) -> None:
    assert sample_frame_indices(n_frames, max_frames) == expected


@settings(max_examples=50, deadline=None)
@given(n_frames=st.integers(1, 10_000), max_frames=st.integers(1, 64))
def test_sampling_is_uniform_ordered_and_keeps_the_endpoints(
    n_frames: int, max_frames: int
) -> None:
    indices = sample_frame_indices(n_frames, max_frames)
    assert len(indices) == min(n_frames, max_frames)
    assert indices[0] == 0
    if len(indices) >= 2:
        assert indices[-1] == n_frames - 1
        gaps = np.diff(indices)
        assert gaps.min() >= 1  # strictly increasing: temporal order, no frame twice
        assert gaps.max() - gaps.min() <= 1  # uniform up to rounding


@settings(max_examples=30, deadline=None)
@given(
    n_frames=st.integers(1, 40),
    max_frames=st.integers(1, 12),
    fps=st.sampled_from([None, 0.5, 2.0, 30.0]),
)
def test_list_clips_keep_order_endpoints_and_timing(
    n_frames: int, max_frames: int, fps: float | None
) -> None:
    # Frame i is a 1x1 grey image of value i, so the loaded pixels reveal which frames were kept.
    frames = [np.full((1, 1), index, np.uint8) for index in range(n_frames)]
    clip = load_video(frames, max_frames=max_frames, fps=fps)
    kept = [frame.getpixel((0, 0))[0] for frame in clip.frames]
    assert kept == sample_frame_indices(n_frames, max_frames)
    assert clip.timestamps == [index / (fps or 1.0) for index in kept]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_max_frames(bad) -> None:
    with pytest.raises(ValueError, match="max_frames must be a positive int"):
        load_video([frame_of(0)], max_frames=bad)
    with pytest.raises(ValueError, match="max_frames must be a positive int"):
        sample_frame_indices(10, bad)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_bad_fps(bad: float) -> None:
    with pytest.raises(ValueError, match="fps must be a positive number"):
        load_video([frame_of(0)], fps=bad)


# --- timestamps as text ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "00:00"),
        (3, "00:03"),
        (2.9, "00:02"),
        (59.99, "00:59"),
        (65, "01:05"),
        (3599, "59:59"),
        (3725, "1:02:05"),
    ],
)
def test_format_timestamp(seconds: float, text: str) -> None:
    assert format_timestamp(seconds) == text


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_format_timestamp_rejects_invalid_times(bad: float) -> None:
    with pytest.raises(ValueError, match="finite number of seconds"):
        format_timestamp(bad)


# --- frame directories ----------------------------------------------------------------------------


def test_directory_frames_are_sorted_naturally_and_timed_by_fps(tmp_path: Path) -> None:
    for index in range(12):
        frame_of(index).save(tmp_path / f"frame{index + 1}.png")  # frame1 .. frame12
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / ".thumbnail.png").write_bytes(b"hidden files are skipped")
    (tmp_path / "extras.png").mkdir()  # a directory with an image suffix is not a frame

    everything = load_video(tmp_path, max_frames=12)
    assert frame_indices(everything) == list(range(12))  # lexical order would put frame10 second
    assert everything.timestamps == [float(index) for index in range(12)]

    sampled = load_video(str(tmp_path), max_frames=4, fps=2.0)
    assert frame_indices(sampled) == [0, 4, 7, 11]
    assert sampled.timestamps == [0.0, 2.0, 3.5, 5.5]
    assert all(frame.mode == "RGB" and frame.size == (8, 6) for frame in sampled.frames)


def test_directory_without_frames_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(VideoLoadError, match="contains no frames"):
        load_video(tmp_path)
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(VideoLoadError, match="contains no frames"):
        load_video(tmp_path)


def test_a_corrupt_frame_file_is_reported(tmp_path: Path) -> None:
    frame_of(0).save(tmp_path / "a1.png")
    (tmp_path / "a2.png").write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="a2.png"):
        load_video(tmp_path)


# --- animations -----------------------------------------------------------------------------------


def test_gif_timestamps_come_from_frame_durations(tmp_path: Path) -> None:
    path = tmp_path / "clip.gif"
    path.write_bytes(animation_bytes([100, 200, 300, 400, 500]))
    clip = load_video(path)
    assert frame_indices(clip) == [0, 1, 2, 3, 4]
    assert clip.timestamps == pytest.approx([0.0, 0.1, 0.3, 0.6, 1.0])

    sampled = load_video(path, max_frames=3)
    assert frame_indices(sampled) == [0, 2, 4]
    assert sampled.timestamps == pytest.approx([0.0, 0.3, 1.0])


def test_gif_from_bytes() -> None:
    clip = load_video(animation_bytes([50, 50, 50]), max_frames=2)
    assert frame_indices(clip) == [0, 2]
    assert clip.timestamps == pytest.approx([0.0, 0.1])


def test_gif_frames_without_duration_are_timed_like_browsers_or_by_fps() -> None:
    data = animation_bytes([0, 0, 0])
    assert load_video(data).timestamps == pytest.approx([0.0, 0.1, 0.2])
    assert load_video(data, fps=4.0).timestamps == pytest.approx([0.0, 0.25, 0.5])


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP support")
def test_animated_webp(tmp_path: Path) -> None:
    path = tmp_path / "clip.webp"
    path.write_bytes(animation_bytes([100, 250, 100, 400], fmt="WEBP", lossless=True))
    clip = load_video(path, max_frames=4)
    assert frame_indices(clip) == [0, 1, 2, 3]
    assert clip.timestamps == pytest.approx([0.0, 0.1, 0.35, 0.45])


def test_animated_png() -> None:
    clip = load_video(animation_bytes([100, 200, 300], fmt="PNG"))
    assert frame_indices(clip) == [0, 1, 2]
    assert clip.timestamps == [0.0, 0.1, 0.3]  # summed in milliseconds: no 0.30000000000000004


def test_truncated_gif_names_the_file(tmp_path: Path) -> None:
    data = animation_bytes([100, 200, 300, 400, 500])
    path = tmp_path / "cut.gif"
    path.write_bytes(data[: int(len(data) * 0.9)])
    with pytest.raises(ImageLoadError, match=r"cut.gif.*truncated"):
        load_video(path)


def test_still_image_is_a_one_frame_video(tmp_path: Path) -> None:
    path = tmp_path / "still.png"
    frame_of(3).save(path)
    clip = load_video(path)
    assert frame_indices(clip) == [3] and clip.timestamps == [0.0]


def test_animation_over_the_pixel_limit_is_refused() -> None:
    with pytest.raises(ImageLoadError, match="max_pixels=10"):
        load_video(animation_bytes([100, 100]), max_pixels=10)


def test_bytes_that_are_no_video() -> None:
    with pytest.raises(VideoLoadError, match="not a recognised image or animation format"):
        load_video(b"definitely not a video")


# --- lists of images ------------------------------------------------------------------------------


def test_list_of_mixed_image_sources(tmp_path: Path) -> None:
    path = tmp_path / "second.png"
    frame_of(1).save(path)
    sources = [frame_of(0), path, np.array(frame_of(2)), png_bytes(frame_of(3))]
    clip = load_video(sources)
    assert frame_indices(clip) == [0, 1, 2, 3]
    assert clip.timestamps == [0.0, 1.0, 2.0, 3.0]
    assert len(clip) == 4


def test_empty_list_is_an_error() -> None:
    with pytest.raises(VideoLoadError, match="frame list: contains no frames"):
        load_video([])


@pytest.mark.parametrize("src", [42, np.zeros((4, 8, 8, 3), np.uint8)])
def test_unsupported_sources(src) -> None:
    with pytest.raises(VideoLoadError, match="unsupported video source"):
        load_video(src)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(VideoLoadError, match="missing.gif.*no such file"):
        load_video(tmp_path / "missing.gif")


# --- MP4 ------------------------------------------------------------------------------------------


def _hide_pyav(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes importlib.util.find_spec report the package as absent.
    monkeypatch.setitem(sys.modules, "av", None)


def test_mp4_without_pyav_explains_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hide_pyav(monkeypatch)
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(16))
    with pytest.raises(VideoLoadError, match=r"clip.mp4.*needs PyAV.*pip install av"):
        load_video(path)


def test_mp4_bytes_without_pyav_explain_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_pyav(monkeypatch)
    with pytest.raises(VideoLoadError, match=r"pip install av"):
        load_video(b"\x00\x00\x00\x18ftypisom" + bytes(16))


@pytest.mark.skipif(
    importlib.util.find_spec("av") is None, reason="PyAV (optional) is not installed"
)
def test_mp4_with_pyav(tmp_path: Path) -> None:
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(10):
            frame = av.VideoFrame.from_image(frame_of(index, size=(64, 48)))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)

    clip = load_video(path, max_frames=4)
    assert frame_indices(clip) == [0, 3, 6, 9]
    assert clip.timestamps == pytest.approx([0.0, 0.6, 1.2, 1.8])
    assert all(frame.mode == "RGB" and frame.size == (64, 48) for frame in clip.frames)
    assert load_video(path.read_bytes(), max_frames=2).timestamps == pytest.approx([0.0, 1.8])
