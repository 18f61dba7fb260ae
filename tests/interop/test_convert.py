"""``import_checkpoint`` for every source kind, part directories, and ``load_part_weights``
(what ``encoder.init_from=DIR`` runs) from part directories and full checkpoints."""
import json

import open_clip
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models._hub import save_for_hf
from transformers import LlamaConfig, LlamaForCausalLM

from minivlm import VisionLanguageModel, preset
from minivlm.config import EncoderConfig, VLMConfig
from minivlm.interop import WeightMappingError
from minivlm.interop.convert import PartConfigMismatchError, import_checkpoint, load_part_weights

TIMM_SMALL = dict(embed_dim=48, depth=2, num_heads=3, img_size=32, patch_size=8)


def vlm_with(part: str, part_config_json: dict, *overrides: str) -> VisionLanguageModel:
    """A small VLM whose ``part`` has the configuration stored in a part directory."""
    cfg = preset("tiny").override("decoder.n_layers=1", "encoder.depth=1", "projector=mlp", *overrides)
    setattr(cfg, part, type(getattr(cfg, part))(**part_config_json))
    if part == "encoder":
        cfg.projector.kind = "mlp"
    return VisionLanguageModel(cfg).eval()


def read_part(directory) -> dict:
    return json.loads((directory / "part.json").read_text())


@pytest.fixture(scope="module")
def siglip(perturb):
    return perturb(timm.create_model("vit_base_patch16_siglip_224", pretrained=False, **TIMM_SMALL)).eval()


def test_timm_hub_directory_becomes_an_encoder_part(parity, siglip, tmp_path):
    save_for_hf(siglip, tmp_path / "timm", safe_serialization=True)
    out = import_checkpoint("timm", tmp_path / "timm", tmp_path / "part")
    meta = read_part(out)
    assert (meta["format"], meta["part"], meta["config"]["pooling"], meta["config"]["normalization"]) == (
        "minivlm-part", "encoder", "map", "siglip")
    assert all(k.startswith("encoder.") for k in load_file(str(out / "model.safetensors")))
    model = vlm_with("encoder", meta["config"])
    load_part_weights(model, "encoder", out)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        parity("convert timm hub dir -> init_from", model.encoder.pooled(pixels),
               siglip.forward_head(siglip.forward_features(pixels), pre_logits=True))


def test_part_made_for_another_image_size_is_resampled_at_load(parity, perturb, tmp_path):
    reference = perturb(timm.create_model("vit_base_patch16_224", pretrained=False, dynamic_img_size=True,
                                          **TIMM_SMALL)).eval()
    save_file(reference.state_dict(), str(tmp_path / "weights.safetensors"))
    out = import_checkpoint("timm", tmp_path / "weights.safetensors", tmp_path / "part",
                            model_name="vit_base_patch16_224", model_args=TIMM_SMALL)
    model = vlm_with("encoder", {**read_part(out)["config"], "image_size": 48})
    load_part_weights(model, "encoder", out)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        parity("convert timm part 32px -> 48px encoder", model.encoder.forward_tokens(pixels),
               reference.forward_features(pixels))


def test_open_clip_hub_directory_becomes_an_encoder_part(parity, perturb, tmp_path):
    model_cfg = open_clip.get_model_config("ViT-B-32-quickgelu")
    model_cfg["vision_cfg"].update(width=64, layers=2, head_width=16, patch_size=8, image_size=32)
    model_cfg["text_cfg"].update(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    clip = perturb(open_clip.model.CLIP(**model_cfg)).eval()
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    # Saved from DistributedDataParallel: every key starts with "module.".
    save_file({f"module.{k}": v.contiguous() for k, v in clip.state_dict().items()},
              str(tmp_path / "oc" / "open_clip_model.safetensors"))
    out = import_checkpoint("open_clip", tmp_path / "oc", tmp_path / "part")
    model = vlm_with("encoder", read_part(out)["config"])
    load_part_weights(model, "encoder", out)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        parity("convert open_clip hub dir -> init_from", model.encoder.pooled(pixels), clip.encode_image(pixels))


def test_hf_llama_directory_becomes_a_decoder_part_with_its_tokenizer(parity, perturb, tmp_path):
    config = LlamaConfig(vocab_size=1024, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=True)
    reference = perturb(LlamaForCausalLM(config)).eval()
    reference.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"\x0asentencepiece bytes")
    out = import_checkpoint("hf-llama", tmp_path / "hf", tmp_path / "part")
    assert (out / "tokenizer.model").read_bytes() == b"\x0asentencepiece bytes"
    model = vlm_with("decoder", read_part(out)["config"])
    load_part_weights(model, "decoder", out)
    ids = torch.randint(4, 1024, (2, 9))
    with torch.no_grad():
        parity("convert hf-llama dir -> init_from", model(ids).logits, reference(ids).logits)


def test_a_full_checkpoint_initialises_only_the_named_part(tmp_path):
    donor = VisionLanguageModel(preset("tiny").override("decoder.n_layers=1", "encoder.depth=1"))
    donor.save_pretrained(tmp_path)
    model = VisionLanguageModel(preset("tiny").override("decoder.n_layers=1", "encoder.depth=1",
                                                        "encoder.feature_layer=0"))
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    load_part_weights(model, "encoder", tmp_path)
    assert all(torch.equal(v, donor.encoder.state_dict()[k]) for k, v in model.encoder.state_dict().items())
    assert all(torch.equal(v, decoder_before[k]) for k, v in model.decoder.state_dict().items())


def test_config_differences_are_all_listed(siglip, tmp_path):
    save_for_hf(siglip, tmp_path / "timm", safe_serialization=True)
    out = import_checkpoint("timm", tmp_path / "timm", tmp_path / "part")
    stored = read_part(out)["config"]
    model = vlm_with("encoder", {**stored, "activation": "gelu_tanh", "norm_eps": 1e-5})
    with pytest.raises(PartConfigMismatchError) as err:
        load_part_weights(model, "encoder", out)
    assert "encoder.activation: checkpoint 'gelu' vs model 'gelu_tanh'" in str(err.value)
    assert "encoder.norm_eps: checkpoint 1e-06 vs model 1e-05" in str(err.value)


def test_stray_and_missing_part_keys_are_all_listed(siglip, tmp_path):
    save_for_hf(siglip, tmp_path / "timm", safe_serialization=True)
    out = import_checkpoint("timm", tmp_path / "timm", tmp_path / "part")
    state = load_file(str(out / "model.safetensors"))
    state["decoder.norm.weight"] = torch.ones(3)
    del state["encoder.norm.bias"], state["encoder.pool_head.latent"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(WeightMappingError) as err:
        load_part_weights(vlm_with("encoder", read_part(out)["config"]), "encoder", out)
    assert err.value.unmapped == ["decoder.norm.weight"]
    assert err.value.missing == ["norm.bias", "pool_head.latent"]


def test_wrong_part_and_bad_directories_are_refused(siglip, tmp_path):
    save_for_hf(siglip, tmp_path / "timm", safe_serialization=True)
    out = import_checkpoint("timm", tmp_path / "timm", tmp_path / "part")
    model = VisionLanguageModel(preset("tiny"))
    with pytest.raises(ValueError, match="holds a 'encoder' part; cannot initialise the 'decoder'"):
        load_part_weights(model, "decoder", out)
    with pytest.raises(ValueError, match="not a minivlm checkpoint: its config.json is not a minivlm config"):
        load_part_weights(model, "encoder", tmp_path / "timm")
    with pytest.raises(FileNotFoundError, match="neither a minivlm part directory"):
        load_part_weights(model, "encoder", tmp_path)
    with pytest.raises(ValueError, match="unknown part 'vision'"):
        load_part_weights(model, "vision", out)


def test_bad_import_requests_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown import kind 'hf'; expected one of \['timm', 'open_clip'"):
        import_checkpoint("hf", tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['image_size'\] for 'hf-llama'"):
        import_checkpoint("hf-llama", tmp_path, tmp_path / "out", image_size=64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_checkpoint("llava", tmp_path / "nope", tmp_path / "out")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="needs model_name="):
        import_checkpoint("timm", tmp_path / "w.safetensors", tmp_path / "out")


def test_part_directory_config_round_trips_into_a_model_config(siglip, tmp_path):
    save_for_hf(siglip, tmp_path / "timm", safe_serialization=True)
    stored = read_part(import_checkpoint("timm", tmp_path / "timm", tmp_path / "part"))["config"]
    cfg = VLMConfig(encoder=EncoderConfig(**stored)).override(f"encoder.init_from={tmp_path / 'part'}")
    assert cfg.encoder.init_from == str(tmp_path / "part") and cfg.validate()
