"""timm ViT / CLIP-style / SigLIP import: parity with timm's forward_features and pooled pre-logits,
position-embedding resampling (non-square grids), and refusals that name every offending key."""
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.encoders.vit import VisionTransformer
from minivlm.interop import UnsupportedLayoutError, WeightMappingError
from minivlm.interop.timm_vit import (encoder_config_from_timm, encoder_from_timm, load_timm_vit, map_timm_vit_state,
                                      normalization_from_stats)

SMALL_A = dict(embed_dim=48, depth=2, num_heads=3, img_size=32, patch_size=8)
SMALL_B = dict(embed_dim=64, depth=2, num_heads=4, img_size=64, patch_size=16)


@pytest.fixture(scope="module")
def timm_model(perturb):
    """``timm_model(name, **kwargs)``: a timm model with random, perturbed weights, in eval mode."""
    return lambda name, **kwargs: perturb(timm.create_model(name, pretrained=False, **kwargs)).eval()


def compare(parity, name: str, reference: torch.nn.Module, ours: VisionTransformer, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        tokens = reference.forward_features(pixels)
        parity(f"timm {name} forward_features", ours.forward_tokens(pixels), tokens)
        parity(f"timm {name} pooled pre-logits", ours.pooled(pixels), reference.forward_head(tokens, pre_logits=True))


@pytest.mark.parametrize("label, name, kwargs, activation, pooling", [
    ("ViT w48", "vit_base_patch16_224", SMALL_A, "gelu", "cls"),
    ("ViT w64", "vit_base_patch16_224", SMALL_B, "gelu", "cls"),
    ("ViT no_embed_class", "vit_base_patch16_224", dict(SMALL_A, no_embed_class=True), "gelu", "cls"),  # DeiT-3
    ("CLIP-style quickgelu", "vit_base_patch32_clip_quickgelu_224", SMALL_B, "quick_gelu", "cls"),  # ln_pre, eps 1e-5
    ("SigLIP exact GELU w48", "vit_base_patch16_siglip_224", SMALL_A, "gelu", "map"),
    ("SigLIP tanh GELU w64", "vit_base_patch32_siglip_256", SMALL_B, "gelu_tanh", "map"),
    ("SigLIP avg pool", "vit_base_patch16_siglip_gap_224", SMALL_A, "gelu", "mean"),  # fc_norm=False
])
def test_features_and_pooled_match_timm(parity, timm_model, label, name, kwargs, activation, pooling):
    reference = timm_model(name, **kwargs)
    ours = encoder_from_timm(reference).eval()
    assert (ours.cfg.activation, ours.cfg.pooling) == (activation, pooling)
    size = kwargs["img_size"]
    compare(parity, label, reference, ours, torch.randn(2, 3, size, size))


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "vit_base_patch16_siglip_224"])
def test_non_square_input_interpolates_position_embeddings_like_timm(parity, timm_model, name):
    # timm's dynamic_img_size resamples the 4x4 grid to 4x6 (bicubic, antialiased) at run time;
    # minivlm's encoder does the same for any input whose grid differs from the trained one.
    reference = timm_model(name, dynamic_img_size=True, **SMALL_A)
    ours = encoder_from_timm(reference).eval()
    compare(parity, f"{name} dynamic 32x48", reference, ours, torch.randn(2, 3, 32, 48))


def test_non_square_trained_grid_is_resampled_to_the_requested_square_size(parity, timm_model):
    reference = timm_model("vit_base_patch16_224", **dict(SMALL_A, img_size=(32, 48)))
    with pytest.raises(UnsupportedLayoutError, match=r"non-square input size \(32, 48\).*4x6"):
        encoder_config_from_timm(reference)
    ours = encoder_from_timm(reference, image_size=48).eval()
    assert ours.pos_embed.shape == (1, 1 + 36, 48)
    reference.set_input_size(img_size=(48, 48))  # timm's own 4x6 -> 6x6 resampling
    compare(parity, "vit 4x6 grid resampled to 6x6", reference, ours, torch.randn(2, 3, 48, 48))


@settings(max_examples=12, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.sampled_from([8, 16]), depth=st.integers(1, 2),
       patch=st.sampled_from([4, 8]), grid=st.integers(2, 4), class_token=st.booleans(),
       pool=st.sampled_from(["token", "avg", "map", ""]), act=st.sampled_from(["gelu", "gelu_tanh", "quick_gelu"]),
       pre_norm=st.booleans(), mlp_ratio=st.sampled_from([2.0, 4.0]))
def test_any_small_timm_vit_imports_exactly(timm_model, heads, head_dim, depth, patch, grid, class_token, pool, act, pre_norm,
                                            mlp_ratio):
    if pool == "token" and not class_token:
        pool = "avg"
    reference = timm_model("vit_base_patch16_224", embed_dim=heads * head_dim, depth=depth, num_heads=heads,
                           img_size=patch * grid, patch_size=patch, class_token=class_token, global_pool=pool,
                           fc_norm=False, act_layer=act, pre_norm=pre_norm, mlp_ratio=mlp_ratio)
    ours = encoder_from_timm(reference).eval()
    pixels = torch.randn(2, 3, patch * grid, patch * grid)
    with torch.no_grad():
        tokens = reference.forward_features(pixels)
        torch.testing.assert_close(ours.forward_tokens(pixels), tokens, atol=1e-4, rtol=0)
        if pool:  # timm's "" returns every token from forward_head: no pooled counterpart
            torch.testing.assert_close(ours.pooled(pixels), reference.forward_head(tokens, pre_logits=True),
                                       atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, expected", [
    ("vit_base_patch16_224", dict(width=768, depth=12, n_heads=12, patch_size=16, image_size=224, class_token=True,
                                  pooling="cls", activation="gelu", pre_norm=False, patch_bias=True)),
    ("vit_base_patch16_clip_224", dict(pre_norm=True, patch_bias=False, norm_eps=1e-5, normalization="clip")),
    ("vit_base_patch16_siglip_224", dict(class_token=False, pooling="map", activation="gelu",
                                         normalization="siglip")),
    ("vit_so400m_patch14_siglip_224", dict(width=1152, depth=27, mlp_dim=4304, patch_size=14, pooling="map")),
])
def test_config_of_named_models_without_allocating_weights(name, expected):
    config = encoder_config_from_timm(name)  # built on the meta device
    assert {k: getattr(config, k) for k in expected} == expected


def test_unsupported_features_are_all_named_before_any_weight_is_read():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, init_values=1e-5, reg_tokens=2,
                              qk_norm=True, global_pool="avg", **SMALL_A)
    with pytest.raises(UnsupportedLayoutError) as err:
        encoder_config_from_timm(model)
    text = str(err.value)
    for feature in ("2 register tokens", "fc_norm", "blocks.0.ls1: layer scale", "blocks.1.ls2: layer scale",
                    "blocks.1.attn.q_norm/k_norm"):
        assert feature in text


def test_every_unmapped_key_is_listed(timm_model):
    plain = VisionTransformer(encoder_config_from_timm(timm_model("vit_base_patch16_224", **SMALL_A)))
    layer_scaled = timm_model("vit_base_patch16_224", init_values=1e-5, **SMALL_A)
    with pytest.raises(WeightMappingError) as err:
        load_timm_vit(plain, layer_scaled.state_dict())
    assert err.value.unmapped == sorted(f"blocks.{i}.ls{j}.gamma" for i in range(2) for j in (1, 2))
    assert "blocks.0.ls1.gamma" in str(err.value) and "blocks.1.ls2.gamma" in str(err.value)


def test_absent_and_mismatched_keys_are_listed_together(timm_model):
    reference = timm_model("vit_base_patch16_224", **SMALL_A)
    encoder = VisionTransformer(encoder_config_from_timm(reference))
    state = dict(reference.state_dict())
    del state["blocks.1.mlp.fc2.bias"], state["norm.weight"]
    state["blocks.0.attn.proj.weight"] = torch.zeros(48, 40)
    before = encoder.blocks[0].attn.proj.weight.clone()
    with pytest.raises(WeightMappingError) as err:
        load_timm_vit(encoder, state)
    assert err.value.absent == ["blocks.1.mlp.fc2.bias", "norm.weight"]
    assert err.value.missing == ["blocks.1.mlp.fc2.bias", "norm.weight"]
    assert err.value.mismatched == ["blocks.0.attn.proj.weight: source [48, 40] vs model [48, 48]"]
    assert torch.equal(encoder.blocks[0].attn.proj.weight, before)  # nothing was loaded


def test_classifier_head_is_skipped_and_logged(timm_model, caplog):
    reference = timm_model("vit_base_patch16_224", num_classes=10, **SMALL_A)
    with caplog.at_level("INFO", logger="minivlm.interop"):
        mapped = map_timm_vit_state(reference.state_dict(), encoder_config_from_timm(reference))
    assert set(mapped.skipped) == {"head.weight", "head.bias"} and mapped.unmapped == []
    assert "timm classifier head" in caplog.text


def test_normalization_is_read_from_the_statistics():
    assert normalization_from_stats((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) == "siglip"
    assert normalization_from_stats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) == "imagenet"
    assert normalization_from_stats((0.1, 0.1, 0.1), (0.2, 0.2, 0.2)) is None


def test_the_pure_mapping_yields_exactly_the_encoder_keys(timm_model):
    reference = timm_model("vit_base_patch16_siglip_224", **SMALL_A)
    config = encoder_config_from_timm(reference)
    state = map_timm_vit_state(reference.state_dict(), config).checked()
    assert state.keys() == VisionTransformer(config).state_dict().keys()
    assert torch.equal(state["pool_head.latent"], reference.attn_pool.latent)
    extra = {**reference.state_dict(), "blocks.0.ls1.gamma": torch.ones(48)}
    with pytest.raises(WeightMappingError, match=r"no minivlm counterpart \(1\): blocks.0.ls1.gamma"):
        map_timm_vit_state(extra, config).checked("layer-scaled checkpoint")
