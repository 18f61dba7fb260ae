"""Hugging Face LLaVA -> VisionLanguageModel: whole-model logits on an image + prompt, the three key
spellings transformers has used, config derivation (LLaVA-1.5 defaults) and refusals."""
import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from minivlm import VisionLanguageModel, preset
from minivlm.interop import UnsupportedLayoutError
from minivlm.interop.convert import import_checkpoint
from minivlm.interop.llava import canonicalize_llava_state, map_llava_state, model_from_llava, vlm_config_from_llava

SHAPE_A = dict(  # LLaVA-1.5 structure: second-to-last CLIP layer, QuickGELU, GQA 6/3, untied head
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                patch_size=8, hidden_act="quick_gelu"),
    text=dict(vocab_size=120, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=3, rope_theta=5000.0, tie_word_embeddings=False),
    llava=dict(image_token_index=100, vision_feature_layer=-2, image_seq_length=16),
)
SHAPE_B = dict(  # patch 14, exact GELU, first-layer features (index 1), tied head, bias-free projector
    vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=28,
                patch_size=14, hidden_act="gelu"),
    text=dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True),
    llava=dict(image_token_index=90, vision_feature_layer=1, image_seq_length=4, multimodal_projector_bias=False),
)


def build_llava(shape: dict, perturb) -> LlavaForConditionalGeneration:
    config = LlavaConfig(vision_config=CLIPVisionConfig(**shape["vision"]), text_config=LlamaConfig(**shape["text"]),
                         **shape["llava"])
    return perturb(LlavaForConditionalGeneration(config), scale=0.05).eval()


def image_prompt(shape: dict, batch: int = 2, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows that each hold one image's worth of placeholders (the processor's expansion of
    ``<image>``: one token per patch, CLS dropped by the "default" strategy), plus the pixels."""
    v, image_token = shape["vision"], shape["llava"]["image_token_index"]
    n_patches = (v["image_size"] // v["patch_size"]) ** 2
    ids = torch.randint(0, image_token, (batch, length))
    ids[:, 2:2 + n_patches] = image_token
    return ids, torch.randn(batch, 3, v["image_size"], v["image_size"])


def test_imported_checkpoint_logits_match_transformers(parity, perturb, tmp_path):
    reference = build_llava(SHAPE_A, perturb)
    reference.save_pretrained(tmp_path / "hf", max_shard_size="50KB")  # sharded, v5 key spelling
    out = import_checkpoint("llava", tmp_path / "hf", tmp_path / "minivlm")
    ours = VisionLanguageModel.from_pretrained(out).eval()
    cfg = ours.config
    assert (cfg.fusion.kind, cfg.encoder.feature_layer, cfg.encoder.feature_norm, cfg.image_token_id) == (
        "splice", -2, False, 100)
    assert cfg.encoder.activation == "quick_gelu" and not cfg.decoder.tie_embeddings
    ids, pixels = image_prompt(SHAPE_A)
    with torch.no_grad():
        parity("llava A (feature layer -2, GQA 6/3, untied) logits", ours(ids, pixel_values=pixels).logits,
               reference(input_ids=ids, pixel_values=pixels).logits)


def test_second_shape_logits_match_transformers(parity, perturb, tmp_path):
    reference = build_llava(SHAPE_B, perturb)
    reference.save_pretrained(tmp_path)
    ours = model_from_llava(tmp_path).eval()
    assert ours.config.encoder.feature_layer == 0 and ours.decoder.lm_head.weight is ours.decoder.embed.weight
    assert not ours.config.projector.bias
    ids, pixels = image_prompt(SHAPE_B)
    with torch.no_grad():
        parity("llava B (patch 14, feature layer 1, tied) logits", ours(ids, pixel_values=pixels).logits,
               reference(input_ids=ids, pixel_values=pixels).logits)


def spelled(canonical: dict[str, torch.Tensor], style: str) -> dict[str, torch.Tensor]:
    """The canonical state under the "older" (< 4.52) or "newer" (4.52+) LLaVA key spelling."""
    prefixes = {
        "older": {"vision_tower.": "vision_tower.vision_model.", "language_model.": "language_model.model.",
                  "lm_head.": "language_model.lm_head.", "multi_modal_projector.": "multi_modal_projector."},
        "newer": {"vision_tower.": "model.vision_tower.vision_model.", "language_model.": "model.language_model.",
                  "lm_head.": "lm_head.", "multi_modal_projector.": "model.multi_modal_projector."},
    }[style]
    out = {}
    for key, tensor in canonical.items():
        head = next(p for p in prefixes if key.startswith(p))
        out[prefixes[head] + key[len(head):]] = tensor
    return out


def test_older_newer_and_v5_key_spellings_map_identically(perturb):
    reference = build_llava(SHAPE_A, perturb)
    config = vlm_config_from_llava(reference.config.to_dict())
    canonical = canonicalize_llava_state(reference.state_dict())
    older, newer = spelled(canonical, "older"), spelled(canonical, "newer")
    assert "language_model.model.layers.0.mlp.up_proj.weight" in older and "language_model.lm_head.weight" in older
    assert "model.vision_tower.vision_model.pre_layrnorm.weight" in newer and "lm_head.weight" in newer
    # transformers < 4.31 also persisted CLIP's position_ids buffer.
    older["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    results = [map_llava_state(state, config) for state in (reference.state_dict(), older, newer)]
    assert all(r.unmapped == [] and r.absent == [] for r in results)
    for other in results[1:]:
        assert other.state.keys() == results[0].state.keys()
        assert all(torch.equal(other.state[k], results[0].state[k]) for k in other.state)


def test_two_spellings_of_one_tensor_are_refused():
    weight = torch.zeros(2)
    with pytest.raises(ValueError, match="mixes key spellings.*language_model.norm.weight"):
        canonicalize_llava_state({"language_model.model.norm.weight": weight, "model.language_model.norm.weight": weight})


# config.json of llava-hf/llava-1.5-7b-hf: most fields are left to transformers' defaults.
LLAVA_15_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
    "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "tie_word_embeddings": False, "vocab_size": 32064,
    "text_config": {"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "vocab_size": 32064},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                      "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
                      "projection_dim": 768, "vocab_size": 32000},
}


def test_llava_15_config_derives_the_llava_15_preset():
    ours = vlm_config_from_llava(LLAVA_15_CONFIG)
    # transformers' own resolution of the omitted fields gives the same result ...
    assert ours == vlm_config_from_llava(LlavaConfig(**LLAVA_15_CONFIG).to_dict())
    # ... and it is the architecture of minivlm's hand-written llava-1.5-7b preset.
    reference = preset("llava-1.5-7b")
    for part in ("encoder", "projector", "fusion", "decoder"):
        assert getattr(ours, part) == getattr(reference, part), part
    assert ours.image_token_id == reference.image_token_id


def test_unsupported_llava_variants_are_named():
    bad = {**LLAVA_15_CONFIG, "vision_feature_select_strategy": "full", "vision_feature_layer": [-2, -5],
           "projector_hidden_act": "gelu_new", "vision_config": {"model_type": "siglip_vision_model"}}
    with pytest.raises(UnsupportedLayoutError) as err:
        vlm_config_from_llava(bad)
    for feature in ("'full' keeps the CLS token", "concatenating several layers", "projector_hidden_act 'gelu_new'"):
        assert feature in str(err.value)
    with pytest.raises(UnsupportedLayoutError, match="'siglip_vision_model'; expected 'clip_vision_model'"):
        vlm_config_from_llava({**LLAVA_15_CONFIG, "vision_config": {"model_type": "siglip_vision_model"}})
    with pytest.raises(UnsupportedLayoutError, match="selects the embedding output"):
        vlm_config_from_llava({**LLAVA_15_CONFIG, "vision_feature_layer": 0})
