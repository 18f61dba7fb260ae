"""load_image: every source type and Pillow mode becomes an upright, loaded RGB image."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minivlm.vision import DEFAULT_MAX_PIXELS, ImageLoadError, load_image


def gradient(height: int = 12, width: int = 16) -> np.ndarray:
    """A [H, W, 3] uint8 image whose every pixel differs, so orientation mistakes show."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return (np.stack([rows * 10, cols * 7, rows * 10 + cols * 7], axis=-1) % 256).astype(np.uint8)


def colours(image: Image.Image) -> set[tuple[int, ...]]:
    """The distinct pixel values of an RGB image."""
    return {tuple(int(v) for v in pixel) for pixel in np.asarray(image).reshape(-1, 3)}


def row_values(image: Image.Image) -> list[int]:
    """Red channel of the first row, for greyscale ramps."""
    return [int(v) for v in np.asarray(image)[0, :, 0]]


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width x height`` RGB pixels but whose data is a few bytes.

    Decoding it would either allocate the full canvas or fail on the bogus data; a loader that
    checks the header first refuses it without trying.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


# --- source types ---------------------------------------------------------------------------------


def test_str_and_pathlike_paths_load_the_file(tmp_path: Path) -> None:
    pixels = gradient()
    path = tmp_path / "picture.png"
    Image.fromarray(pixels).save(path)
    for src in (str(path), path):
        image = load_image(src)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_encoded_bytes_load(wrap) -> None:
    pixels = gradient()
    image = load_image(wrap(encode(Image.fromarray(pixels), "PNG")))
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_pil_image_is_returned_as_a_new_loaded_copy() -> None:
    original = Image.fromarray(gradient())
    image = load_image(original)
    assert image is not original
    np.testing.assert_array_equal(np.asarray(image), gradient())
    image.putpixel((0, 0), (1, 2, 3))
    assert original.getpixel((0, 0)) != (1, 2, 3)


def test_lazily_opened_pil_image_is_decoded() -> None:
    lazy = Image.open(io.BytesIO(encode(Image.fromarray(gradient()), "PNG")))
    np.testing.assert_array_equal(np.asarray(load_image(lazy)), gradient())


@pytest.mark.parametrize(
    "array, expected_rgb",
    [
        (np.full((4, 5), 200, np.uint8), (200, 200, 200)),
        (np.full((4, 5, 1), 200, np.uint8), (200, 200, 200)),
        (np.full((4, 5, 3), (10, 20, 30), np.uint8), (10, 20, 30)),
        (np.full((4, 5, 4), (10, 20, 30, 255), np.uint8), (10, 20, 30)),
        (np.full((4, 5, 3), 32896, np.uint16), (128, 128, 128)),
        (np.full((4, 5), 65535, np.uint16), (255, 255, 255)),
        (np.full((4, 5), 32896, ">u2"), (128, 128, 128)),
        (np.ones((4, 5), np.bool_), (255, 255, 255)),
        (np.zeros((4, 5, 3), np.bool_), (0, 0, 0)),
        (np.full((4, 5, 3), 0.5, np.float32), (128, 128, 128)),
        (np.full((4, 5), 1.0, np.float64), (255, 255, 255)),
        (np.full((4, 5, 3), 0.25, np.float16), (64, 64, 64)),
    ],
    ids=[
        "HxW",
        "HxWx1",
        "HxWx3",
        "HxWx4-opaque",
        "uint16-mid",
        "uint16-max",
        "uint16-big-endian",
        "bool-true",
        "bool-false",
        "float32",
        "float64",
        "float16",
    ],
)
def test_numpy_arrays_of_each_supported_shape_and_dtype(array: np.ndarray, expected_rgb) -> None:
    image = load_image(array)
    assert image.mode == "RGB" and image.size == (5, 4)
    assert colours(image) == {expected_rgb}


def test_torch_tensors_channels_first_and_last_agree() -> None:
    pixels = gradient()
    hwc = torch.from_numpy(pixels)
    chw = hwc.permute(2, 0, 1)
    np.testing.assert_array_equal(np.asarray(load_image(hwc)), pixels)
    np.testing.assert_array_equal(np.asarray(load_image(chw)), pixels)
    np.testing.assert_array_equal(np.asarray(load_image(chw.float() / 255)), pixels)
    np.testing.assert_array_equal(
        np.asarray(load_image(torch.ones(3, 12, 16, dtype=torch.bfloat16))),
        np.full_like(pixels, 255),
    )


def test_torch_tensor_greyscale_and_single_channel() -> None:
    grey = torch.full((6, 7), 0.5)
    assert colours(load_image(grey)) == {(128, 128, 128)}
    assert colours(load_image(grey.unsqueeze(0))) == {(128, 128, 128)}
    assert load_image(grey.unsqueeze(0)).size == (7, 6)


def test_tensor_requiring_grad_is_accepted() -> None:
    tensor = torch.rand(3, 4, 5, requires_grad=True)
    assert load_image(tensor).size == (5, 4)


# --- mode conversions -----------------------------------------------------------------------------


def test_rgba_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (3, 2), (255, 0, 0, 128))  # half-transparent red
    rgba.putpixel(
        (0, 0), (0, 0, 255, 0)
    )  # fully transparent blue must become white, not blue/black
    rgba.putpixel((1, 0), (0, 255, 0, 255))  # opaque green stays green
    image = load_image(rgba)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (0, 255, 0)
    red, green, blue = image.getpixel((2, 1))
    # 128/255 red over white: 255 in red, 255 * (1 - 128/255) = 127 in green and blue.
    assert red == 255 and abs(green - 127) <= 1 and abs(blue - 127) <= 1


def test_rgba_numpy_array_is_composited_on_white() -> None:
    array = np.zeros((2, 2, 4), np.uint8)  # transparent black
    assert colours(load_image(array)) == {(255, 255, 255)}


def test_la_is_composited_on_white() -> None:
    la = Image.new("LA", (2, 2), (0, 0))  # transparent black
    la.putpixel((0, 0), (50, 255))
    image = load_image(la)
    assert image.getpixel((0, 0)) == (50, 50, 50)
    assert image.getpixel((1, 1)) == (255, 255, 255)


def test_palette_without_transparency() -> None:
    palette_image = Image.new("P", (2, 2), 1)
    palette_image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert colours(load_image(palette_image)) == {(10, 200, 30)}


def test_palette_with_transparent_index_from_a_gif_file(tmp_path: Path) -> None:
    palette_image = Image.new("P", (4, 4), 0)
    palette_image.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)
    palette_image.paste(1, (2, 0, 4, 4))  # right half colour 1, left half transparent index 0
    path = tmp_path / "transparent.gif"
    palette_image.save(path, transparency=0)
    image = load_image(path)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((3, 3)) == (200, 30, 10)


def test_greyscale_and_bilevel_become_grey_rgb() -> None:
    assert colours(load_image(Image.new("L", (2, 2), 77))) == {(77, 77, 77)}
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    assert row_values(load_image(bilevel)) == [0, 255]


def test_cmyk_is_converted(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=100)  # pure red in CMYK
    red, green, blue = load_image(path).getpixel((4, 4))
    assert red > 240 and green < 15 and blue < 15


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_mid_grey_maps_to_128_not_white(mode: str) -> None:
    # 32896 = 128 * 257 is mid-grey in 16 bits; clipping to 8 bits (Pillow's convert) gives 255.
    image = Image.new(mode, (3, 3), 32896)
    assert colours(load_image(image)) == {(128, 128, 128)}


def test_sixteen_bit_png_file_is_scaled(tmp_path: Path) -> None:
    ramp = np.array([[0, 257 * 64, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    assert row_values(load_image(path)) == [0, 64, 128, 255]


def test_float_mode_uses_pillows_0_to_255_scale() -> None:
    values = Image.fromarray(np.array([[-5.0, 0.0, 128.4, 300.0]], dtype=np.float32))
    assert values.mode == "F"
    assert row_values(load_image(values)) == [0, 0, 128, 255]


# --- EXIF orientation -----------------------------------------------------------------------------


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 tall: left half red, right half blue. Orientation 6 means "rotate 90
    # degrees clockwise to display": the result is 20 wide x 40 tall with red on top.
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)

    image = load_image(path)
    assert image.size == (20, 40)
    top_red, _, top_blue = image.getpixel((10, 5))
    bottom_red, _, bottom_blue = image.getpixel((10, 35))
    assert top_red > 200 and top_blue < 50
    assert bottom_blue > 200 and bottom_red < 50


# --- decompression bombs --------------------------------------------------------------------------


def test_header_declaring_a_huge_canvas_is_refused_before_decoding(tmp_path: Path) -> None:
    # Pillow's own check (twice its limit) fires first here, inside Image.open.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming_size(100_000, 100_000))
    with pytest.raises(ImageLoadError) as excinfo:
        load_image(path)
    message = str(excinfo.value)
    assert "bomb.png" in message
    assert "10000000000 pixels" in message
    assert f"max_pixels={DEFAULT_MAX_PIXELS:,}" in message
    assert "decompression bomb" in message


def test_limit_above_pillows_own_is_checked_on_the_header(tmp_path: Path) -> None:
    # A limit looser than Pillow's switches Pillow's check off; ours still reads the header
    # first (decoding this file would fail with a data error, or try to allocate 30 GB).
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming_size(100_000, 100_000))
    with pytest.raises(ImageLoadError) as excinfo:
        load_image(path, max_pixels=1_000_000_000)
    assert "100000x100000 = 10,000,000,000 pixels" in str(excinfo.value)
    assert "max_pixels=1,000,000,000" in str(excinfo.value)


def test_pixel_limit_is_configurable_per_call() -> None:
    data = encode(Image.new("RGB", (1500, 1000), (5, 6, 7)), "PNG")
    with pytest.raises(ImageLoadError, match=r"1500x1000 = 1,500,000 pixels.*max_pixels=1,000,000"):
        load_image(data, max_pixels=1_000_000)
    assert load_image(data, max_pixels=1_500_000).size == (1500, 1000)
    assert load_image(data, max_pixels=None).size == (1500, 1000)


def test_limit_applies_to_in_memory_sources_too() -> None:
    with pytest.raises(ImageLoadError, match="max_pixels=99"):
        load_image(np.zeros((10, 10), np.uint8), max_pixels=99)


def test_pillows_global_limit_is_restored_after_success_and_failure() -> None:
    before = Image.MAX_IMAGE_PIXELS
    load_image(encode(Image.new("RGB", (4, 4)), "PNG"), max_pixels=10 * DEFAULT_MAX_PIXELS)
    assert Image.MAX_IMAGE_PIXELS == before
    with pytest.raises(ImageLoadError):
        load_image(png_claiming_size(100_000, 100_000))
    assert Image.MAX_IMAGE_PIXELS == before


def test_threads_with_different_limits_all_load_and_leave_pillows_limit_alone() -> None:
    before = Image.MAX_IMAGE_PIXELS
    data = encode(Image.fromarray(gradient()), "PNG")
    limits = [None, DEFAULT_MAX_PIXELS, 10 * DEFAULT_MAX_PIXELS, 1_000] * 8
    with ThreadPoolExecutor(max_workers=4) as pool:
        images = list(pool.map(lambda limit: load_image(data, max_pixels=limit), limits))
    assert all(np.array_equal(np.asarray(image), gradient()) for image in images)
    assert Image.MAX_IMAGE_PIXELS == before


def test_non_positive_limit_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(np.zeros((2, 2), np.uint8), max_pixels=0)


# --- errors naming the source ---------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.png"
    with pytest.raises(ImageLoadError, match="nowhere.png.*no such file"):
        load_image(path)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_corrupt_file_is_not_recognised(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(ImageLoadError, match="noise.png.*not a recognised image format"):
        load_image(path)


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file_is_reported(tmp_path: Path, fmt: str, suffix: str) -> None:
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noisy), fmt)
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=f"cut.{suffix}.*corrupt or truncated"):
        load_image(path)


def test_empty_bytes() -> None:
    with pytest.raises(ImageLoadError, match="0 bytes.*empty"):
        load_image(b"")


def test_load_errors_are_value_errors() -> None:
    assert issubclass(ImageLoadError, ValueError)


@pytest.mark.parametrize(
    "src, expected",
    [
        (42, "type int"),
        ([[0, 1], [2, 3]], "type list"),
        (np.zeros((4, 4), np.int64), "unsupported dtype int64"),
        (np.full((4, 4), 1.5, np.float32), r"values in \[0, 1\], got range \[1.5, 1.5\]"),
        (np.full((4, 4), np.nan, np.float32), "NaN"),
        (np.zeros((4, 4, 2), np.uint8), r"got \(4, 4, 2\)"),
        (np.zeros((2, 4, 4, 3), np.uint8), r"got \(2, 4, 4, 3\)"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (torch.zeros(5, 4, 6), r"got shape \(5, 4, 6\)"),
        (torch.zeros(1, 3, 4, 4), "4 dimensions"),
        (torch.zeros(3, 4, 4, dtype=torch.int32), "unsupported dtype int32"),
    ],
    ids=[
        "int",
        "list",
        "int64-array",
        "float-range",
        "nan",
        "two-channels",
        "4d-array",
        "empty-array",
        "tensor-channels",
        "4d-tensor",
        "int-tensor",
    ],
)
def test_unsupported_inputs_name_what_was_expected(src, expected: str) -> None:
    with pytest.raises(ImageLoadError, match=expected):
        load_image(src)
