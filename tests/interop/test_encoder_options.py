"""The two encoder options the Idefics3 / SmolVLM import needs, as config fields with validation."""
from __future__ import annotations

import pytest
import torch

from minivlm.config import ConfigError, EncoderConfig, VLMConfig
from minivlm.encoders.vit import VisionTransformer, idefics3_position_index
from minivlm.registry import validate_config


def encoder(**fields) -> VisionTransformer:
    config = VLMConfig(encoder=EncoderConfig(**{"width": 16, "depth": 1, "n_heads": 2, "mlp_dim": 32, **fields}))
    return VisionTransformer(validate_config(config))


def test_idefics3_positions_are_the_grid_where_float_rounding_allows_and_repeat_rows_where_not():
    assert torch.equal(idefics3_position_index(4), torch.arange(16))
    index = idefics3_position_index(19)
    assert len(index) == 361 and len(set(index.tolist())) < 361  # some rows read twice, others never
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 38, 38)
    grid, buckets = encoder(image_size=38, patch_size=2), encoder(image_size=38, patch_size=2, pos_index="idefics3")
    buckets.load_state_dict(grid.state_dict())
    with torch.no_grad():
        expected = grid.pos_embed[:, index]
        assert torch.allclose(buckets.embed(pixels) - grid.embed(pixels), expected - grid.pos_embed, atol=1e-6)


def test_pos_index_is_validated():
    with pytest.raises(ConfigError, match="encoder.pos_index: expected grid | idefics3"):
        encoder(pos_index="bucketised")
    with pytest.raises(ConfigError, match="encoder.pos_index: idefics3 indexes a learned table"):
        encoder(pos_index="idefics3", class_token=True, pooling="cls")


def test_drop_remainder_reads_only_the_whole_patches():
    with pytest.raises(ConfigError, match="not a multiple of encoder.patch_size=3.*drop_remainder"):
        encoder(image_size=14, patch_size=3)
    with pytest.raises(ConfigError, match="encoder.image_size"):
        encoder(image_size=14, patch_size=4, drop_remainder=True, stem="conv")
    vit = encoder(image_size=14, patch_size=3, drop_remainder=True).eval()
    pixels = torch.randn(1, 3, 14, 14)
    changed = pixels.clone()
    changed[..., 12:, :] = 5.0  # the pixels beyond 4 x 3 are never read
    with torch.no_grad():
        assert vit(pixels).shape == (1, 16, 16)
        assert torch.equal(vit(pixels), vit(changed))
