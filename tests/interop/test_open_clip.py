"""open_clip visual towers: CLIP ViTs (exact ViT-B/32 shape and shrunk ViT-B/32-quickgelu and
ViT-L/14-336 shapes) and SigLIP timm trunks, against ``encode_image`` and the token features."""
import copy

import open_clip
import pytest
import timm
import torch
from open_clip.model import CLIP, CustomTextCLIP

from minivlm.encoders.vit import VisionTransformer
from minivlm.interop import UnsupportedLayoutError, tied_aliases, verify_mapped
from minivlm.interop.open_clip import encoder_config_from_open_clip, encoder_from_open_clip, map_open_clip_visual_state

TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
#: SigLIP-shaped timm ViTs small enough for a unit test (open_clip builds timm trunks by name only).
TINY_SIGLIP = {"vit_minivlm_test_siglip_tiny_gelu": "gelu", "vit_minivlm_test_siglip_tiny_tanh": "gelu_tanh"}


def _register_tiny_siglip(name: str, activation: str) -> None:
    from timm.models import build_model_with_cfg
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    def create(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay"):
            kwargs.pop(key, None)
        args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, class_token=False,
                    global_pool="map", act_layer=activation)
        return build_model_with_cfg(TimmViT, name, pretrained, pretrained_cfg=dict(mean=(0.5,) * 3, std=(0.5,) * 3),
                                    **dict(args, **kwargs))

    create.__name__ = name  # timm registers a model under its factory's name
    if not timm.is_model(name):
        timm.models.register_model(create)


for _name, _activation in TINY_SIGLIP.items():
    _register_tiny_siglip(_name, _activation)


def shrunk(name: str, embed_dim: int = 32, **vision) -> dict:
    """open_clip's config ``name`` with a smaller vision tower and a one-layer text tower."""
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    cfg["vision_cfg"].update(vision)
    cfg["text_cfg"].update(TINY_TEXT)
    cfg["embed_dim"] = embed_dim
    return cfg


def build_clip(cfg: dict, perturb) -> torch.nn.Module:
    kwargs = {k: cfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu") if k in cfg}
    return perturb((CustomTextCLIP if cfg.get("custom_text") else CLIP)(**kwargs)).eval()


def compare_clip(parity, label: str, clip: torch.nn.Module, ours: VisionTransformer, pixels: torch.Tensor) -> None:
    clip.visual.output_tokens = True
    with torch.no_grad():
        pooled, tokens = clip.visual(pixels)
        parity(f"open_clip {label} encode_image", ours.pooled(pixels), pooled)
        parity(f"open_clip {label} tokens", ours.forward_tokens(pixels)[:, 1:], tokens)


def test_exact_vit_b_32_matches_encode_image_and_tokens(parity, perturb):
    clip = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    perturb(clip.visual)
    ours = encoder_from_open_clip(clip, "ViT-B-32").eval()
    assert (ours.cfg.width, ours.cfg.depth, ours.cfg.patch_size, ours.cfg.embed_dim) == (768, 12, 32, 512)
    compare_clip(parity, "ViT-B-32 (exact shape)", clip, ours, torch.randn(1, 3, 224, 224))


@pytest.mark.parametrize("label, cfg, activation", [
    ("ViT-B-32-quickgelu shrunk", shrunk("ViT-B-32-quickgelu", width=64, layers=2, head_width=16, patch_size=8,
                                         image_size=32), "quick_gelu"),
    ("ViT-L-14-336 shrunk", shrunk("ViT-L-14-336", width=64, layers=2, head_width=32, image_size=42), "gelu"),
    ("ViT-B-32 avg pool shrunk", shrunk("ViT-B-32", width=48, layers=2, head_width=16, patch_size=8, image_size=32,
                                        pool_type="avg"), "gelu"),
])
def test_shrunk_clip_towers_match(parity, perturb, label, cfg, activation):
    clip = build_clip(cfg, perturb)
    ours = encoder_from_open_clip(clip, cfg).eval()
    assert ours.cfg.activation == activation
    size = cfg["vision_cfg"]["image_size"]
    compare_clip(parity, label, clip, ours, torch.randn(2, 3, size, size))


@pytest.mark.parametrize("trunk, proj, embed_dim", [
    ("vit_minivlm_test_siglip_tiny_gelu", "none", None),  # ViT-B-16-SigLIP's head: MAP pool, no projection
    ("vit_minivlm_test_siglip_tiny_tanh", "linear", 32),  # with a bias-free linear projection to 32
])
def test_shrunk_siglip_towers_match(parity, perturb, trunk, proj, embed_dim):
    cfg = shrunk("ViT-B-16-SigLIP", embed_dim=32, timm_model_name=trunk, image_size=32, timm_proj=proj)
    clip = build_clip(cfg, perturb)
    ours = encoder_from_open_clip(clip, cfg).eval()
    expected = (TINY_SIGLIP[trunk], embed_dim, False, "map", "siglip")
    assert (ours.cfg.activation, ours.cfg.embed_dim, ours.cfg.class_token, ours.cfg.pooling,
            ours.cfg.normalization) == expected
    pixels = torch.randn(2, 3, 32, 32)
    label = f"open_clip SigLIP shrunk ({ours.cfg.activation}, proj {proj})"
    with torch.no_grad():
        parity(f"{label} encode_image", ours.pooled(pixels), clip.encode_image(pixels))
        parity(f"{label} tokens", ours.forward_tokens(pixels), clip.visual.trunk.forward_features(pixels))


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu", "ViT-L-14-336", "ViT-B-16-SigLIP"])
def test_every_full_size_tensor_maps_with_the_right_shape(name):
    # Built on the meta device: the full-size layouts are checked key by key without allocating them.
    with torch.device("meta"):
        clip = open_clip.create_model(name, pretrained=None, device="meta")
        config = encoder_config_from_open_clip(name)
        encoder = VisionTransformer(config)
    mapped = map_open_clip_visual_state(clip.state_dict(), config, name)
    verify_mapped(mapped, {k: v.shape for k, v in encoder.state_dict().items()}, name, tied_aliases(encoder))
    assert len(mapped.state) == len(encoder.state_dict())


def test_config_of_the_llava_tower_shape():
    config = encoder_config_from_open_clip("ViT-L-14-336")
    assert (config.width, config.depth, config.n_heads, config.mlp_dim) == (1024, 24, 16, 4096)
    assert (config.image_size, config.patch_size, config.embed_dim) == (336, 14, 768)
    assert (config.class_token, config.pre_norm, config.patch_bias, config.norm_eps) == (True, True, False, 1e-5)
    # open_clip's config says nothing about QuickGELU here (its "openai" tag forces it at load).
    assert config.activation == "gelu"
    assert encoder_config_from_open_clip("ViT-B-32-quickgelu").activation == "quick_gelu"


def test_text_tower_keys_are_skipped_with_a_reason():
    with torch.device("meta"):
        clip = open_clip.create_model("ViT-B-32", pretrained=None, device="meta")
    config = encoder_config_from_open_clip("ViT-B-32")
    mapped = map_open_clip_visual_state(clip.state_dict(), config, "ViT-B-32")
    assert mapped.unmapped == [] and "logit_scale" in mapped.skipped and "text_projection" in mapped.skipped
    assert not any(k.startswith("visual.") for k in mapped.skipped)


def test_unsupported_towers_are_named():
    cfg = shrunk("ViT-B-32", ls_init_value=1e-5, attentional_pool=True, final_ln_after_pool=True, head_width=100)
    with pytest.raises(UnsupportedLayoutError) as err:
        encoder_config_from_open_clip(cfg)
    for feature in ("layer scale", "attentional pooler", "final_ln_after_pool", "head_width 100"):
        assert feature in str(err.value)
    with pytest.raises(UnsupportedLayoutError, match="ModifiedResNet"):
        encoder_config_from_open_clip("RN50")
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-X-99'"):
        encoder_config_from_open_clip("ViT-X-99")
