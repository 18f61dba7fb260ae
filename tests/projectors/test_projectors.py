"""Embedding projectors: output shapes and the pixel-shuffle token grouping, checked by hand."""
import pytest
import torch

from minivlm import preset
from minivlm.projectors import pixel_shuffle
from minivlm.registry import PROJECTORS, image_tokens


@pytest.mark.parametrize("kind, tokens", [("linear", 64), ("mlp", 64), ("pixel_shuffle", 16), ("resampler", 16)])
def test_projector_shapes(kind, tokens):
    cfg = preset("tiny").override(f"projector={kind}")
    proj = PROJECTORS.get(kind)(cfg)
    out = proj(torch.randn(3, 64, cfg.encoder.width))
    assert out.shape == (3, tokens, cfg.decoder.width) and tokens == image_tokens(cfg)


def test_pixel_shuffle_groups_neighbourhoods():
    # A 4x4 grid of 1-d tokens numbered row-major 0..15; factor 2 groups each 2x2 block.
    x = torch.arange(16.0).view(1, 16, 1)
    out = pixel_shuffle(x, 2)
    assert out.shape == (1, 4, 4)
    assert out[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_pixel_shuffle_rejects_bad_grids():
    with pytest.raises(ValueError, match="square patch grid"):
        pixel_shuffle(torch.randn(1, 12, 4), 2)
    with pytest.raises(ValueError, match="factor 3 does not divide the 4x4"):
        pixel_shuffle(torch.randn(1, 16, 4), 3)


def test_llava_mlp_layout():
    cfg = preset("tiny").override("projector=mlp", "projector.hidden_dim=40")
    proj = PROJECTORS.get("mlp")(cfg)
    assert [type(m).__name__ for m in proj.mlp] == ["Linear", "GELU", "Linear"]
    assert proj.mlp[0].weight.shape == (40, 128) and proj.mlp[2].weight.shape == (192, 40)
