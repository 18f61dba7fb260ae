"""Export: a minivlm decoder written as a Hugging Face Llama directory loads in transformers and
computes the same logits; importing it back gives the same tensors."""
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from minivlm import VisionLanguageModel, preset
from minivlm.config import DecoderConfig
from minivlm.decoders.llama import LlamaDecoder
from minivlm.interop.export import decoder_state_to_hf, export_hf_llama, hf_llama_config
from minivlm.interop.hf_llama import decoder_from_hf
from minivlm.kernels.mask import AttentionMask


def decoder_logits(decoder, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return decoder.logits(decoder(decoder.embed(ids), AttentionMask.causal_lm(), positions))


@pytest.mark.parametrize("label, config", [
    ("GQA 6q/3kv tied", DecoderConfig(vocab_size=90, width=48, n_layers=2, n_heads=6, n_kv_heads=3, mlp_dim=80,
                                      rope_theta=777.0, tie_embeddings=True)),
    ("head_dim 12 untied", DecoderConfig(vocab_size=70, width=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12,
                                         mlp_dim=64, norm_eps=1e-6, tie_embeddings=False)),
])
def test_round_trip_through_transformers(parity, perturb, tmp_path, label, config):
    ours = perturb(LlamaDecoder(config)).eval()
    export_hf_llama(ours, tmp_path)
    reference = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        parity(f"export {label}: transformers logits", reference(ids).logits, decoder_logits(ours, ids))
    back = decoder_from_hf(tmp_path)
    assert back.cfg == config
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_export_from_a_vlm_with_dtype_tokenizer_and_token_ids(tmp_path):
    model = VisionLanguageModel(preset("tiny").override("decoder.n_layers=1", "encoder.depth=1"))
    tokenizer = tmp_path / "source.model"
    tokenizer.write_bytes(b"\x0asentencepiece model bytes")
    out = export_hf_llama(model, tmp_path / "hf", dtype=torch.bfloat16, tokenizer_file=tokenizer,
                          bos_token_id=1, eos_token_id=2)
    config = json.loads((out / "config.json").read_text())
    assert (config["torch_dtype"], config["bos_token_id"], config["eos_token_id"]) == ("bfloat16", 1, 2)
    assert (out / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    reference = LlamaForCausalLM.from_pretrained(out)
    assert reference.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(reference.model.embed_tokens.weight, model.decoder.embed.weight.to(torch.bfloat16))


def test_tied_heads_are_saved_once():
    config = DecoderConfig(vocab_size=40, width=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=32)
    state = decoder_state_to_hf(LlamaDecoder(config).state_dict(), config)
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    assert hf_llama_config(config)["tie_word_embeddings"] is True


def test_bad_export_requests_are_refused(tmp_path):
    config = DecoderConfig(vocab_size=40, width=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=32)
    with pytest.raises(TypeError, match="expected a VisionLanguageModel or LlamaDecoder; got Linear"):
        export_hf_llama(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        hf_llama_config(config, torch.int8)
    with pytest.raises(ValueError, match=r"unknown token id field\(s\) \['unk_token_id'\]"):
        hf_llama_config(config, unk_token_id=0)
    with pytest.raises(KeyError, match="lacks 1 key"):
        decoder_state_to_hf({k: v for k, v in LlamaDecoder(config).state_dict().items() if k != "norm.weight"}, config)
