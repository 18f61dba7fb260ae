"""Hugging Face Llama-format decoders: sharded directories, GQA, RoPE theta, tied and untied heads,
config defaults and refusals, persisted RoPE tables, and clear errors for broken weight files."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minivlm.decoders.llama import LlamaDecoder
from minivlm.interop import UnsupportedLayoutError, WeightMappingError
from minivlm.interop.hf_llama import (decoder_config_from_hf, decoder_from_hf, load_hf_llama, load_hf_state,
                                      map_hf_llama_state)
from minivlm.safetensors_io import WeightsFileError
from minivlm.kernels.mask import AttentionMask


def decoder_logits(decoder, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return decoder.logits(decoder(decoder.embed(ids), AttentionMask.causal_lm(), positions))


def save_sharded(model: torch.nn.Module, directory) -> None:
    model.save_pretrained(directory, max_shard_size="20KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("label, kwargs", [
    # 6 query heads sharing 3 key/value heads: an odd group count.
    ("GQA 6q/3kv tied theta 5e3", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                                        rope_theta=5000.0, tie_word_embeddings=True)),
    # head_dim 24 != hidden/heads = 16, one kv head (MQA), untied head, Llama-3 style theta.
    ("MQA 4q/1kv head_dim 24 untied theta 5e5", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                                     head_dim=24, rope_theta=500000.0, tie_word_embeddings=False)),
])
def test_sharded_checkpoint_logits_match_transformers(parity, perturb, tmp_path, label, kwargs):
    config = LlamaConfig(vocab_size=97, intermediate_size=80, num_hidden_layers=2, rms_norm_eps=1e-5, **kwargs)
    reference = perturb(LlamaForCausalLM(config)).eval()
    save_sharded(reference, tmp_path)
    ours = decoder_from_hf(tmp_path).eval()
    assert (ours.cfg.n_heads, ours.cfg.n_kv_heads, ours.cfg.rope_theta) == (
        kwargs["num_attention_heads"], kwargs["num_key_value_heads"], kwargs["rope_theta"])
    assert (ours.lm_head.weight is ours.embed.weight) == kwargs["tie_word_embeddings"]
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        parity(f"hf-llama {label} logits", decoder_logits(ours, ids), reference(ids).logits)


def test_a_minimal_config_takes_transformers_defaults():
    # Old config.json files leave most fields to LlamaConfig's defaults (Llama-7B shapes).
    config = decoder_config_from_hf({"model_type": "llama", "vocab_size": 32064, "rms_norm_eps": 1e-5,
                                     "max_position_embeddings": 4096})
    resolved = decoder_config_from_hf(LlamaConfig(vocab_size=32064, rms_norm_eps=1e-5,
                                                  max_position_embeddings=4096).to_dict())
    assert config == resolved
    assert (config.width, config.n_layers, config.n_heads, config.n_kv_heads, config.mlp_dim) == (4096, 32, 32, 32,
                                                                                                   11008)


@pytest.mark.parametrize("rope", [{"rope_theta": 123.0},  # transformers v4 spelling
                                  {"rope_parameters": {"rope_type": "default", "rope_theta": 123.0}}])  # v5
def test_rope_theta_is_read_in_both_spellings(rope):
    assert decoder_config_from_hf({"model_type": "llama", **rope}).rope_theta == 123.0


def test_unsupported_configs_are_named():
    with pytest.raises(UnsupportedLayoutError) as err:
        decoder_config_from_hf({"model_type": "qwen2", "attention_bias": True, "hidden_act": "gelu",
                                "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    for feature in ("model_type 'qwen2'", "hidden_act 'gelu'", "attention_bias", "RoPE scaling 'llama3'"):
        assert feature in str(err.value)


def test_persisted_rope_tables_are_checked_then_skipped():
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, tie_word_embeddings=True)
    state = dict(LlamaForCausalLM(config).state_dict())
    ours = decoder_config_from_hf(config.to_dict())
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = inv_freq  # transformers < 4.31 saved this buffer
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in map_hf_llama_state(state, ours).skipped
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = inv_freq / 8  # a scaled RoPE: must not be dropped
    assert map_hf_llama_state(state, ours).unmapped == ["model.layers.0.self_attn.rotary_emb.inv_freq"]


def test_an_untied_config_with_a_headless_file_lists_the_missing_head():
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, tie_word_embeddings=True)
    state = {k: v for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    untied = decoder_config_from_hf({**config.to_dict(), "tie_word_embeddings": False})
    with pytest.raises(WeightMappingError) as err:
        load_hf_llama(LlamaDecoder(untied), state)
    assert err.value.absent == ["lm_head.weight"] and err.value.missing == ["lm_head.weight"]


def test_a_missing_shard_or_a_shard_without_its_keys_is_named(tmp_path):
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4)
    save_sharded(LlamaForCausalLM(config), tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    index["weight_map"]["model.extra.weight"] = victim
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsFileError, match=f"{victim} lacks 1 tensor.*model.extra.weight"):
        load_hf_state(tmp_path)
    (tmp_path / victim).unlink()
    with pytest.raises(WeightsFileError, match=f"weights file not found: .*{victim}"):
        load_hf_state(tmp_path)


def test_a_directory_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsFileError, match="holds no weights"):
        load_hf_state(tmp_path)


def test_a_pytorch_bin_checkpoint_loads_through_weights_only(tmp_path, parity):
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    reference = LlamaForCausalLM(config).eval()
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    ours = decoder_from_hf(tmp_path).eval()
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        parity("hf-llama pytorch_model.bin logits", decoder_logits(ours, ids), reference(ids).logits)
