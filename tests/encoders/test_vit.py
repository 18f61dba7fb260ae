"""ViT/CLIP/SigLIP encoder: feature layer selection, pooling heads, resolution change, bad input."""
import pytest
import torch

from minivlm.config import EncoderConfig
from minivlm import preset
from minivlm.config import ConfigError
from minivlm.encoders.vit import VisionTransformer, mean_and_differences, resize_pos_embed, sincos_2d_pos_embed
from minivlm.registry import validate_config


def small(**kw):
    base = dict(image_size=32, patch_size=8, width=32, depth=3, n_heads=4, mlp_dim=64)
    base.update(kw)
    return VisionTransformer(EncoderConfig(**base)).eval()


def test_features_are_patch_tokens_from_the_chosen_block():
    enc = small(class_token=True, pre_norm=True, pooling="cls", feature_layer=-2, feature_norm=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = enc.embed(x)
        for blk in enc.blocks[:2]:
            h = blk(h)
        feats = enc(x)
    assert feats.shape == (2, 16, 32)  # class token dropped
    torch.testing.assert_close(feats, h[:, 1:])


def test_final_norm_applies_to_last_layer_features():
    enc = small()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc.forward_tokens(x))


@pytest.mark.parametrize("pooling, extra, dim", [
    ("cls", dict(class_token=True), 32),
    ("mean", {}, 32),
    ("map", dict(activation="gelu_tanh"), 32),
    ("cls", dict(class_token=True, embed_dim=24, activation="quick_gelu"), 24),
])
def test_pooled_embeddings(pooling, extra, dim):
    enc = small(pooling=pooling, **extra)
    out = enc.pooled(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, dim)
    assert torch.isfinite(out).all()


def test_other_resolution_interpolates_position_embeddings():
    enc = small(class_token=True, pooling="cls")
    out = enc(torch.randn(1, 3, 48, 40))  # a 6x5 grid: not square, not the trained 4x4
    assert out.shape == (1, 30, 32)


def test_resize_pos_embed_keeps_prefix_and_identity():
    pos = torch.randn(1, 1 + 16, 8)
    same = resize_pos_embed(pos, (4, 4), n_prefix=1)
    assert same is pos
    bigger = resize_pos_embed(pos, (6, 3), n_prefix=1)
    assert bigger.shape == (1, 1 + 18, 8)
    torch.testing.assert_close(bigger[:, :1], pos[:, :1])
    # a constant field stays constant under interpolation
    const = torch.ones(1, 16, 8)
    torch.testing.assert_close(resize_pos_embed(const, (7, 7), 0), torch.ones(1, 49, 8))


@pytest.mark.parametrize("shape, fragment", [
    ((1, 1, 32, 32), r"\[N, 3, H, W\]"),
    ((3, 32, 32), r"\[N, 3, H, W\]"),
    ((1, 3, 30, 32), "multiples of the patch size 8"),
])
def test_bad_pixels(shape, fragment):
    with pytest.raises(ValueError, match=fragment):
        small()(torch.randn(*shape))


def test_temporal_patches_take_stacked_frames():
    enc = small(temporal_patch_size=2, stem="conv")
    assert enc(torch.randn(2, 6, 32, 32)).shape == (2, 16, 32)
    with pytest.raises(ValueError, match=r"\[N, 6 \(2 frames of 3\), H, W\]; got \(2, 3, 32, 32\)"):
        enc(torch.randn(2, 3, 32, 32))


def test_a_still_through_temporal_patches_equals_the_single_frame_encoder():
    """I3D inflation (Carreira & Zisserman 2017): a patch kernel split evenly over time sees a
    repeated image exactly as the 2-D kernel sees the image."""
    torch.manual_seed(0)
    flat, deep = small(), small(temporal_patch_size=2)
    state = flat.state_dict()
    state["patch_embed.weight"] = torch.cat([state["patch_embed.weight"] / 2] * 2, dim=1)
    deep.load_state_dict(state)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(deep(x.repeat(1, 2, 1, 1)), flat(x), atol=1e-5, rtol=1e-5)
    moving = torch.cat([x, x.roll(4, dims=-1)], dim=1)  # a second frame shifted right
    assert not torch.allclose(deep(moving), flat(x), atol=1e-3)


def test_mean_and_differences_is_an_invertible_change_of_basis():
    frames = torch.randn(2, 3, 3, 8, 8)  # N, time, RGB, H, W
    basis = mean_and_differences(frames.flatten(1, 2), 3).view(2, 3, 3, 8, 8)
    torch.testing.assert_close(basis[:, 0], frames.mean(1))
    torch.testing.assert_close(basis[:, 1:], frames[:, 1:] - frames[:, :-1])
    first = basis[:, 0] - (2 * basis[:, 1] + basis[:, 2]) / 3  # mean minus the offsets of frame 0
    torch.testing.assert_close(first, frames[:, 0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("stem", ["patch", "conv", "hybrid"])
def test_with_differences_a_still_is_one_frame_in_value_and_in_gradient(stem):
    torch.manual_seed(0)
    flat, deep = small(stem=stem), small(stem=stem, temporal_patch_size=3, temporal_input="differences")
    state = flat.state_dict()
    for key, value in deep.state_dict().items():
        if value.shape != state[key].shape:  # the kernels that read pixels: random time slices
            state[key] = torch.cat([state[key], torch.randn_like(value[:, 3:])], dim=1)
    deep.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    out = deep(x.repeat(1, 3, 1, 1))
    torch.testing.assert_close(out, flat(x), atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    stem_module = deep.patch_embed
    pixel_readers = [stem_module] if stem == "patch" else [stem_module.layers[0], stem_module.linear]
    for kernel in (m.weight for m in pixel_readers if m is not None):
        assert kernel.grad[:, :3].abs().sum() > 0 and kernel.grad[:, 3:].abs().sum() == 0
    with pytest.raises(ConfigError, match="encoder.temporal_input: expected frames | differences"):
        validate_config(preset("tiny").override("encoder.temporal_input=delta"))


@pytest.mark.parametrize("stem", ["conv", "hybrid"])
def test_conv_stems_keep_the_patch_grid_and_unit_scale(stem):
    enc = small(stem=stem)
    x = torch.randn(4, 3, 32, 32)
    assert enc.patch_embed(x).shape == (4, 32, 4, 4)
    assert 0.3 < enc.patch_embed(x).std().item() < 3.0  # He init: patch features above pos-embed scale
    assert enc(x).shape == (4, 16, 32)


def test_the_hybrid_stem_is_the_conv_stack_plus_the_linear_patch_path():
    torch.manual_seed(0)
    conv, hybrid = small(stem="conv"), small(stem="hybrid")
    assert conv.patch_embed.linear is None  # the stack alone: no linear path
    conv.load_state_dict({k: v for k, v in hybrid.state_dict().items() if ".linear." not in k})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(hybrid.patch_embed(x), conv.patch_embed(x) + hybrid.patch_embed.linear(x))


def test_a_model_saved_when_conv_meant_hybrid_loads_as_hybrid(tmp_path):
    import json

    from minivlm import preset
    from minivlm.model import VisionLanguageModel
    from tests.tinykit import TINY_PARTS

    cfg = preset("tiny").override(*TINY_PARTS, "encoder.image_size=32", "encoder.patch_size=8", "encoder.stem=hybrid")
    model = VisionLanguageModel(cfg)
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    saved["encoder"]["stem"] = "conv"  # as written before the two stems were told apart
    (tmp_path / "m" / "config.json").write_text(json.dumps(saved))
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m", load_processor=False).eval()
    model.eval()
    assert loaded.config.encoder.stem == "hybrid"
    x = torch.rand(1, cfg.encoder.pixel_channels, cfg.encoder.image_size, cfg.encoder.image_size)
    torch.testing.assert_close(loaded.encoder(x), model.encoder(x))


def test_conv_stem_needs_a_power_of_two_patch():
    from minivlm import preset
    from minivlm.config import ConfigError

    with pytest.raises(ConfigError, match="encoder.stem"):
        validate_config(preset("tiny").override("encoder.stem=conv", "encoder.patch_size=12", "encoder.image_size=48"))


def test_sincos_2d_values_follow_the_formula():
    pe = sincos_2d_pos_embed((2, 3), 8)  # 2 frequencies per quarter: 1 and 1/10000
    assert pe.shape == (6, 8)
    row, col = 1, 2  # patch 5 in row-major order
    omega = torch.tensor([1.0, 1e-4])
    expected = torch.cat([(col * omega).sin(), (col * omega).cos(), (row * omega).sin(), (row * omega).cos()])
    torch.testing.assert_close(pe[5], expected)
    # every patch gets its own code
    assert torch.cdist(pe, pe).add(torch.eye(6) * 1e3).min() > 0.1


def test_sincos_2d_needs_a_width_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4; got 6"):
        sincos_2d_pos_embed((2, 2), 6)
    from minivlm import preset
    from minivlm.config import ConfigError

    with pytest.raises(ConfigError, match="encoder.pos_embed"):
        validate_config(preset("tiny").override("encoder.pos_embed=sincos2d", "encoder.width=130", "encoder.n_heads=2"))
    with pytest.raises(ConfigError, match="expected learned | sincos2d, got 'rope'"):
        validate_config(preset("tiny").override("encoder.pos_embed=rope"))


def test_sincos_position_embeddings_are_fixed_and_not_saved():
    enc = small(pos_embed="sincos2d", class_token=True, pooling="cls")
    assert "pos_embed" not in dict(enc.named_parameters())
    assert "pos_embed" not in enc.state_dict()  # rebuilt from the config on load
    torch.testing.assert_close(enc.pos_embed[0, 0], torch.zeros(32))  # the class-token slot
    torch.testing.assert_close(enc.pos_embed[0, 1:], sincos_2d_pos_embed((4, 4), 32))
    assert 0.5 < enc.pos_embed[0, 1:].pow(2).mean().sqrt() < 1.0  # the scale of unit patch features


def test_sincos_at_another_resolution_uses_the_exact_grid_code():
    enc = small(pos_embed="sincos2d")
    x = torch.randn(1, 3, 48, 40)  # a 6x5 grid
    with torch.no_grad():
        patches = enc.patch_embed(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(enc.embed(x), patches + sincos_2d_pos_embed((6, 5), 32))
        assert enc(x).shape == (1, 30, 32)
