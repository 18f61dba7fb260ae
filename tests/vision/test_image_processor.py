"""ImageProcessor: fitting to a square, normalisation, tiling, and config round trips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from minivlm.vision import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
    SIGLIP_MEAN,
    SIGLIP_STD,
    ImageProcessor,
    ImageProcessorConfig,
    choose_tile_grid,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def bands(colours: list[tuple[int, int, int]], band_width: int, height: int) -> Image.Image:
    """Vertical stripes, ``band_width`` pixels each, left to right."""
    image = Image.new("RGB", (band_width * len(colours), height))
    for index, colour in enumerate(colours):
        image.paste(colour, (index * band_width, 0, (index + 1) * band_width, height))
    return image


def normalised(colour: tuple[int, int, int], normalization: str = "clip") -> torch.Tensor:
    """The expected ``[3]`` normalised value of an 8-bit RGB colour."""
    mean, std = NORMALIZATIONS[normalization]
    return (torch.tensor(colour, dtype=torch.float32) / 255 - torch.tensor(mean)) / torch.tensor(
        std
    )


def pixel(view: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """``[3]`` channel vector of a ``[3, H, W]`` view."""
    return view[:, row, col]


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- config ---------------------------------------------------------------------------------------


def test_normalisation_constants_are_the_published_ones() -> None:
    assert (
        NORMALIZATIONS["clip"]
        == (CLIP_MEAN, CLIP_STD)
        == ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    )
    assert NORMALIZATIONS["siglip"] == (SIGLIP_MEAN, SIGLIP_STD) == ((0.5,) * 3, (0.5,) * 3)
    assert (
        NORMALIZATIONS["imagenet"]
        == (IMAGENET_MEAN, IMAGENET_STD)
        == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", 0),
        ("image_size", 32.0),
        ("image_size", True),
        ("max_tiles", 0),
        ("resize", "pad"),
        ("normalization", "openai"),
        ("interpolation", "cubic"),
        ("split_image", "yes"),
        ("max_pixels", -1),
    ],
)
def test_invalid_config_names_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"ImageProcessorConfig.{field}"):
        ImageProcessorConfig(**{field: value})


def test_config_round_trips_through_json() -> None:
    config = ImageProcessorConfig(
        image_size=32,
        resize="letterbox",
        normalization="siglip",
        split_image=True,
        max_tiles=6,
        interpolation="bilinear",
        max_pixels=None,
    )
    restored = ImageProcessor.from_dict(json.loads(json.dumps(ImageProcessor(config).to_dict())))
    assert restored.config == config


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown ImageProcessorConfig keys \['img_size'\]"):
        ImageProcessor.from_dict({"img_size": 32})


def test_default_output_is_one_normalised_view() -> None:
    out = ImageProcessor()(random_image(100, 80))
    assert out.pixel_values.shape == (1, 3, 64, 64)
    assert out.pixel_values.dtype == torch.float32
    assert (out.rows, out.cols, out.n_views) == (0, 0, 1)


def test_accepts_every_load_image_source(tmp_path: Path) -> None:
    image = random_image(20, 10)
    path = tmp_path / "source.png"
    image.save(path)
    processor = ImageProcessor(ImageProcessorConfig(image_size=16))
    reference = processor(image).pixel_values
    array = np.array(image)
    for source in (
        path,
        str(path),
        path.read_bytes(),
        array,
        torch.from_numpy(array).permute(2, 0, 1),
    ):
        torch.testing.assert_close(processor(source).pixel_values, reference)


# --- normalisation --------------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", sorted(NORMALIZATIONS))
def test_normalised_values_follow_mean_and_std(normalization: str) -> None:
    colour = (255, 0, 128)
    processor = ImageProcessor(ImageProcessorConfig(image_size=8, normalization=normalization))
    view = processor(Image.new("RGB", (8, 8), colour)).pixel_values[0]
    expected = normalised(colour, normalization).view(3, 1, 1).expand(3, 8, 8)
    torch.testing.assert_close(view, expected)


def test_siglip_maps_black_and_white_to_minus_one_and_one() -> None:
    processor = ImageProcessor(ImageProcessorConfig(image_size=4, normalization="siglip"))
    assert torch.all(processor(Image.new("RGB", (4, 4), (0, 0, 0))).pixel_values == -1)
    assert torch.all(processor(Image.new("RGB", (4, 4), (255, 255, 255))).pixel_values == 1)


@pytest.mark.parametrize("normalization", sorted(NORMALIZATIONS))
def test_unnormalize_round_trips_to_the_original_pixels(normalization: str) -> None:
    image = random_image(32, 32)  # already image_size, so no resampling happens
    processor = ImageProcessor(ImageProcessorConfig(image_size=32, normalization=normalization))
    restored = processor.unnormalize(processor(image).pixel_values)[0]
    original = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(restored, original, atol=1e-6, rtol=0)


def test_unnormalize_clamps_to_the_displayable_range_and_checks_shape() -> None:
    processor = ImageProcessor()
    assert processor.unnormalize(torch.full((2, 3, 4, 4), 100.0)).max() == 1.0
    assert processor.unnormalize(torch.full((3, 4, 4), -100.0)).min() == 0.0
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\].*\(4, 4\)"):
        processor.unnormalize(torch.zeros(4, 4))


# --- fitting to a square --------------------------------------------------------------------------


def test_resize_stretches_ignoring_aspect() -> None:
    processor = ImageProcessor(ImageProcessorConfig(image_size=32, interpolation="nearest"))
    view = processor(bands([RED, BLUE], band_width=64, height=40)).pixel_values[0]
    assert view.shape == (3, 32, 32)
    torch.testing.assert_close(pixel(view, 0, 0), normalised(RED))
    torch.testing.assert_close(pixel(view, 31, 15), normalised(RED))
    torch.testing.assert_close(pixel(view, 31, 16), normalised(BLUE))


def test_letterbox_pads_a_wide_image_top_and_bottom_with_the_mean_colour() -> None:
    processor = ImageProcessor(ImageProcessorConfig(image_size=64, resize="letterbox"))
    view = processor(Image.new("RGB", (128, 64), RED)).pixel_values[0]
    # 128x64 fits as 64x32, centred: rows 0-15 and 48-63 are padding.
    assert torch.all(view[:, :16] == 0) and torch.all(view[:, 48:] == 0)
    torch.testing.assert_close(view[:, 16:48], normalised(RED).view(3, 1, 1).expand(3, 32, 64))
    padding_colour = processor.unnormalize(view)[:, 0, 0]
    torch.testing.assert_close(padding_colour, torch.tensor(CLIP_MEAN))


def test_letterbox_pads_a_tall_image_left_and_right() -> None:
    processor = ImageProcessor(
        ImageProcessorConfig(image_size=30, resize="letterbox", normalization="siglip")
    )
    view = processor(Image.new("RGB", (10, 20), GREEN)).pixel_values[0]
    # 10x20 fits as 15x30, centred at columns 7..21.
    assert torch.all(view[:, :, :7] == 0) and torch.all(view[:, :, 22:] == 0)
    torch.testing.assert_close(
        view[:, :, 7:22], normalised(GREEN, "siglip").view(3, 1, 1).expand(3, 30, 15)
    )


def test_letterbox_of_a_square_image_has_no_padding() -> None:
    processor = ImageProcessor(ImageProcessorConfig(image_size=16, resize="letterbox"))
    view = processor(Image.new("RGB", (40, 40), BLUE)).pixel_values[0]
    torch.testing.assert_close(view, normalised(BLUE).view(3, 1, 1).expand(3, 16, 16))


@pytest.mark.parametrize("orientation", ["wide", "tall"])
def test_crop_keeps_the_centre(orientation: str) -> None:
    image = bands([RED, GREEN, BLUE], band_width=64, height=64)  # 192x64, centre square green
    if orientation == "tall":
        image = image.transpose(Image.Transpose.ROTATE_90)  # 64x192, centre square still green
    processor = ImageProcessor(ImageProcessorConfig(image_size=32, resize="crop"))
    view = processor(image).pixel_values[0]
    # Bicubic support reaches ~2 source pixels past the crop box, so skip the view's outer ring.
    torch.testing.assert_close(
        view[:, 1:-1, 1:-1], normalised(GREEN).view(3, 1, 1).expand(3, 30, 30), atol=0.02, rtol=0
    )


# --- tile grid ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height, max_tiles, expected",
    [
        (50, 40, 4, (1, 1)),  # fits one tile
        (64, 64, 4, (1, 1)),  # exactly one tile
        (65, 64, 4, (1, 1)),  # barely larger: 2 columns would stretch it 2x
        (256, 64, 4, (1, 4)),  # wide strip
        (64, 256, 4, (4, 1)),  # tall strip
        (512, 512, 4, (2, 2)),  # large square uses the whole budget
        (512, 512, 9, (3, 3)),
        (1000, 500, 4, (1, 2)),  # 2:1 keeps 2:1 rather than filling 2x2
        (1000, 500, 8, (2, 4)),  # same aspect, more tiles when allowed
        (1000, 600, 9, (2, 3)),  # 1.67 -> 1.5 is the closest grid within 9 tiles
        (130, 100, 16, (2, 3)),  # native-resolution cap: at most ceil(100/64) x ceil(130/64)
        (2000, 100, 4, (1, 4)),  # extreme aspect: as close as the budget allows
        (512, 512, 1, (1, 1)),
    ],
)
def test_tile_grid_examples(
    width: int, height: int, max_tiles: int, expected: tuple[int, int]
) -> None:
    assert choose_tile_grid(width, height, 64, max_tiles) == expected


@settings(max_examples=50, deadline=None)
@given(
    width=st.integers(1, 4000),
    height=st.integers(1, 4000),
    tile_size=st.sampled_from([16, 64, 224, 384]),
    max_tiles=st.integers(1, 12),
)
def test_tile_grid_properties(width: int, height: int, tile_size: int, max_tiles: int) -> None:
    rows, cols = choose_tile_grid(width, height, tile_size, max_tiles)
    assert 1 <= rows * cols <= max_tiles
    assert rows <= max(1, math.ceil(height / tile_size)) and cols <= max(
        1, math.ceil(width / tile_size)
    )
    # The grid leans the same way as the image, and transposing the image transposes the grid.
    if width >= height:
        assert cols >= rows
    assert choose_tile_grid(height, width, tile_size, max_tiles) == (cols, rows)


def test_tile_grid_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_tiles must be a positive int, got 0"):
        choose_tile_grid(100, 100, 64, 0)
    with pytest.raises(ValueError, match="width"):
        choose_tile_grid(0, 100, 64, 4)


# --- splitting ------------------------------------------------------------------------------------


def split_processor(**overrides) -> ImageProcessor:
    config = {"image_size": 64, "split_image": True, "max_tiles": 4, **overrides}
    return ImageProcessor(ImageProcessorConfig(**config))


def normalised_crop(image: Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:
    crop = np.asarray(image.crop(box), dtype=np.float32) / 255
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    return ((torch.from_numpy(crop) - mean) / std).permute(2, 0, 1)


def test_wide_image_tiles_are_the_crops_in_row_major_order_then_the_global_view() -> None:
    image = random_image(256, 64)  # exactly a 1x4 grid: tiles are untouched crops
    processor = split_processor()
    out = processor(image)
    assert (out.rows, out.cols, out.n_views) == (1, 4, 5)
    assert out.pixel_values.shape == (5, 3, 64, 64)
    for col in range(4):
        torch.testing.assert_close(
            out.pixel_values[col], normalised_crop(image, (64 * col, 0, 64 * (col + 1), 64))
        )
    global_only = ImageProcessor(ImageProcessorConfig(image_size=64))(image).pixel_values[0]
    torch.testing.assert_close(out.pixel_values[-1], global_only)


def test_image_is_resized_onto_the_grid_before_cutting() -> None:
    image = random_image(300, 140)  # grid 1x2 (aspect 2.1): resized to 128x64, then cut
    out = split_processor()(image)
    assert (out.rows, out.cols) == (1, 2)
    on_grid = image.resize((128, 64), Image.Resampling.BICUBIC)
    for col in range(2):
        torch.testing.assert_close(
            out.pixel_values[col], normalised_crop(on_grid, (64 * col, 0, 64 * (col + 1), 64))
        )


def test_tall_image_tiles_go_top_to_bottom() -> None:
    image = bands([RED, GREEN, BLUE], band_width=64, height=64).transpose(
        Image.Transpose.ROTATE_270
    )
    out = split_processor(interpolation="nearest")(image)  # 64x192, red on top after rotation
    assert (out.rows, out.cols, out.n_views) == (3, 1, 4)
    top, middle, bottom = (pixel(out.pixel_values[index], 32, 32) for index in range(3))
    torch.testing.assert_close(top, normalised(RED))
    torch.testing.assert_close(middle, normalised(GREEN))
    torch.testing.assert_close(bottom, normalised(BLUE))


def test_2x2_grid_row_major_order() -> None:
    corners = [(0, 0), (64, 0), (0, 64), (64, 64)]  # top-left, top-right, bottom-left, ...
    colours = [RED, GREEN, BLUE, (255, 255, 0)]
    quadrants = Image.new("RGB", (128, 128))
    for (left, top), colour in zip(corners, colours, strict=True):
        quadrants.paste(colour, (left, top, left + 64, top + 64))
    out = split_processor()(quadrants)
    assert (out.rows, out.cols) == (2, 2)
    for index, colour in enumerate(colours):
        torch.testing.assert_close(pixel(out.pixel_values[index], 10, 10), normalised(colour))


def test_small_image_gets_one_tile_plus_the_global_view() -> None:
    out = split_processor()(random_image(40, 30))
    assert (out.rows, out.cols, out.n_views) == (1, 1, 2)
    torch.testing.assert_close(
        out.pixel_values[0], out.pixel_values[1]
    )  # both are the 64x64 resize


def test_global_view_follows_the_resize_mode_when_splitting() -> None:
    out = split_processor(resize="letterbox")(Image.new("RGB", (256, 64), RED))
    global_view = out.pixel_values[-1]
    assert torch.all(global_view[:, :24] == 0) and torch.all(global_view[:, 40:] == 0)
    assert not torch.any(out.pixel_values[:-1] == 0)  # tiles are never padded


def test_saved_views_of_a_real_photo(tmp_path: Path) -> None:
    """Writes skimage's astronaut as tiles and letterboxed, as PNGs for a person to inspect.

    Run with ``--basetemp`` to keep them; the assertions check the saved files hold what the
    processor produced and that the tiles reassemble into the image resized onto the grid.
    """
    data = pytest.importorskip("skimage.data")
    astronaut = Image.fromarray(data.astronaut())  # 512x512 photo
    processor = split_processor(image_size=128)
    out = processor(astronaut)
    assert (out.rows, out.cols) == (2, 2)

    views = (
        (processor.unnormalize(out.pixel_values) * 255)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .numpy()
    )
    names = ["tile_0_0", "tile_0_1", "tile_1_0", "tile_1_1", "global"]
    for name, view in zip(names, views, strict=True):
        Image.fromarray(view).save(tmp_path / f"astronaut_{name}.png")
    top = np.concatenate([views[0], views[1]], axis=1)
    bottom = np.concatenate([views[2], views[3]], axis=1)
    reassembled = np.concatenate([top, bottom], axis=0)
    Image.fromarray(reassembled).save(tmp_path / "astronaut_reassembled.png")
    on_grid = np.asarray(astronaut.resize((256, 256), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(reassembled.astype(int) - on_grid).max() <= 1

    wide_crop = astronaut.crop((0, 128, 512, 384))  # 512x256 band through the face
    letterboxer = ImageProcessor(ImageProcessorConfig(image_size=128, resize="letterbox"))
    letterboxed = letterboxer.unnormalize(letterboxer(wide_crop).pixel_values[0])
    letterboxed_pixels = (letterboxed * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(letterboxed_pixels).save(tmp_path / "astronaut_letterboxed.png")

    for name, expected in [("tile_1_1", views[3]), ("letterboxed", letterboxed_pixels)]:
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / f"astronaut_{name}.png")), expected
        )
    mean_colour = np.round(np.array(CLIP_MEAN) * 255)
    assert np.all(letterboxed_pixels[:32] == mean_colour) and np.all(
        letterboxed_pixels[96:] == mean_colour
    )
