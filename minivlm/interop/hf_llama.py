"""Hugging Face Llama-format decoders -> minivlm :class:`LlamaDecoder` (and the key table export uses).

Reference: transformers ``models/llama/modeling_llama.py`` (``LlamaForCausalLM``) and
``configuration_llama.py``. A checkpoint is a directory with ``config.json`` and either one
``model.safetensors`` or shards listed in ``model.safetensors.index.json`` (``.bin`` files are read
with ``torch.load(weights_only=True)`` only)::

    model.embed_tokens                        -> embed
    model.layers.i.input_layernorm            -> layers.i.attn_norm
    model.layers.i.self_attn.{q,k,v,o}_proj   -> layers.i.attn.{q,k,v,o}
    model.layers.i.post_attention_layernorm   -> layers.i.mlp_norm
    model.layers.i.mlp.{gate,up,down}_proj    -> layers.i.mlp.{gate,up,down}
    model.norm                                -> norm
    lm_head                                   -> lm_head (untied only; tied heads alias embed)

Both use the "rotate half" RoPE layout, so q/k need no permutation (that permutation is only
for Meta's original consolidated checkpoints, which this importer does not read).
``config.json`` files may omit fields; missing ones take transformers' ``LlamaConfig`` defaults
(:data:`LLAMA_DEFAULTS`), as ``from_pretrained`` would.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from minivlm.config import DecoderConfig
from minivlm.decoders.llama import LlamaDecoder
from minivlm.interop import MappedState, StateMapper, load_mapped, raise_if_unsupported
from minivlm.safetensors_io import WeightsFileError, load_safetensors, load_weights

#: transformers ``LlamaConfig`` defaults for fields a config.json may leave out.
LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "rope_theta": 10000.0,
}
SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


def _rope(config: Mapping[str, Any]) -> tuple[float, str]:
    """``(theta, rope_type)`` from transformers v5 ``rope_parameters`` or v4 ``rope_theta`` + ``rope_scaling``."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", LLAMA_DEFAULTS["rope_theta"]))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), rope_type


def decoder_config_from_hf(config: Mapping[str, Any], tie_embeddings: bool | None = None) -> DecoderConfig:
    """Derive the :class:`DecoderConfig` of a Hugging Face Llama ``config.json`` (as a dict).

    Args:
        config: the parsed config.json (or ``LlamaConfig.to_dict()``).
        tie_embeddings: override ``tie_word_embeddings`` (LLaVA keeps it on the outer config).

    Raises:
        UnsupportedLayoutError: for another model type, biases, a non-SiLU MLP or RoPE scaling.
    """
    source = f"Hugging Face {config.get('model_type', '?')} config"
    cfg = {**LLAMA_DEFAULTS, **config}
    problems = []
    if config.get("model_type", "llama") != "llama":
        problems.append(f"model_type {config.get('model_type')!r}; expected 'llama'")
    if cfg["hidden_act"] != "silu":
        problems.append(f"hidden_act {cfg['hidden_act']!r}; minivlm's SwiGLU uses silu")
    if cfg["attention_bias"] or cfg["mlp_bias"]:
        problems.append("attention_bias/mlp_bias: minivlm's decoder projections are bias-free")
    theta, rope_type = _rope(config)
    if rope_type != "default":
        problems.append(f"RoPE scaling {rope_type!r}; minivlm implements plain RoPE")
    raise_if_unsupported(source, problems)
    width, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg["head_dim"]
    return DecoderConfig(
        vocab_size=cfg["vocab_size"],
        width=width,
        n_layers=cfg["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=cfg["num_key_value_heads"] or heads,
        head_dim=head_dim if head_dim and head_dim * heads != width else None,
        mlp_dim=cfg["intermediate_size"],
        rope_theta=theta,
        norm_eps=cfg["rms_norm_eps"],
        tie_embeddings=bool(cfg["tie_word_embeddings"] if tie_embeddings is None else tie_embeddings),
        max_seq_len=cfg["max_position_embeddings"],
    )


def llama_key_pairs(config: DecoderConfig, body: str = "model.", head: str = "lm_head.weight") -> list[tuple[str, str]]:
    """``(Hugging Face key, minivlm key)`` for every tensor of a Llama decoder.

    ``body`` is the prefix of the transformer (``"model."`` in ``LlamaForCausalLM``,
    ``"model.language_model."`` inside LLaVA); the head pair is present only when untied.
    The single source of truth for both import and :mod:`~minivlm.interop.export`.
    """
    pairs = [(f"{body}embed_tokens.weight", "embed.weight")]
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k",
                 "self_attn.v_proj": "attn.v", "self_attn.o_proj": "attn.o",
                 "post_attention_layernorm": "mlp_norm", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
                 "mlp.down_proj": "mlp.down"}
    for i in range(config.n_layers):
        pairs += [(f"{body}layers.{i}.{theirs}.weight", f"layers.{i}.{ours}.weight") for theirs, ours in per_layer.items()]
    pairs.append((f"{body}norm.weight", "norm.weight"))
    if not config.tie_embeddings:
        pairs.append((head, "lm_head.weight"))
    return pairs


def _is_default_inv_freq(config: DecoderConfig) -> Callable[[Tensor], bool]:
    """A check for persisted ``rotary_emb.inv_freq`` buffers (transformers < 4.31 saved them)."""
    d = config.resolved_head_dim
    expected = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))

    def valid(t: Tensor) -> bool:
        return t.shape == expected.shape and torch.allclose(t.float(), expected, rtol=1e-3)

    return valid


def map_hf_llama_into(mapper: StateMapper, config: DecoderConfig, body: str = "model.",
                      head: str = "lm_head.weight", dst: str = "") -> None:
    """Add the moves for one Llama decoder to ``mapper`` (minivlm keys under ``dst``)."""
    for theirs, ours in llama_key_pairs(config, body, head):
        mapper.move(theirs, dst + ours)
    if config.tie_embeddings:
        mapper.skip(head, f"tied to {body}embed_tokens.weight (tie_word_embeddings)")
    inv_freq_ok = _is_default_inv_freq(config)

    def is_default_rope_table(key: str) -> bool:
        return key.startswith(body) and key.endswith("rotary_emb.inv_freq") and inv_freq_ok(mapper.foreign[key])

    # A table that differs (scaled RoPE) stays unmapped and is reported.
    mapper.skip_where(is_default_rope_table, "RoPE frequencies, recomputed from rope_theta")


def map_hf_llama_state(state: Mapping[str, Tensor], config: DecoderConfig) -> MappedState:
    """Pure key mapping: a ``LlamaForCausalLM`` state dict -> minivlm decoder keys (relative to the decoder)."""
    mapper = StateMapper(state)
    map_hf_llama_into(mapper, config)
    return mapper.result()


def load_hf_llama(decoder: LlamaDecoder, state: Mapping[str, Tensor],
                  source: str = "Hugging Face Llama state dict") -> LlamaDecoder:
    """Copy a ``LlamaForCausalLM`` state dict into a minivlm decoder, refusing any unmapped/absent/mismatched key."""
    return load_mapped(decoder, map_hf_llama_state(state, decoder.cfg), source)


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face checkpoint directory."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a Hugging Face checkpoint directory: config.json is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def load_hf_state(directory: str | Path) -> dict[str, Tensor]:
    """Every tensor of a Hugging Face checkpoint directory, sharded or not.

    Looks for, in order: ``model.safetensors.index.json`` (shards), ``model.safetensors``,
    ``pytorch_model.bin.index.json``, ``pytorch_model.bin``. A shard named by the index that is
    missing, or that lacks a key the index assigns to it, is an error naming the file.
    """
    d = Path(directory)
    for index_name, reader in ((SAFE_INDEX, load_safetensors), (BIN_INDEX, load_weights)):
        index_path = d / index_name
        if not index_path.is_file():
            continue
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise WeightsFileError(f"{index_path} is not a valid shard index (needs a 'weight_map'): {err}") from err
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors = reader(d / shard)
            listed = {k for k, f in weight_map.items() if f == shard}
            lacking = sorted(listed - tensors.keys())
            if lacking:
                raise WeightsFileError(f"{d / shard} lacks {len(lacking)} tensor(s) that {index_name} assigns to it: "
                                       f"{', '.join(lacking)}")
            state.update(tensors)
        return state
    for single, reader in ((SAFE_SINGLE, load_safetensors), (BIN_SINGLE, load_weights)):
        if (d / single).is_file():
            return reader(d / single)
    raise WeightsFileError(f"{d} holds no weights: expected {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX} or {BIN_SINGLE}")


def decoder_from_hf(directory: str | Path) -> LlamaDecoder:
    """A minivlm decoder built from a Hugging Face Llama checkpoint directory, with its weights."""
    config = decoder_config_from_hf(read_hf_config(directory))
    return load_hf_llama(LlamaDecoder(config), load_hf_state(directory), str(directory))

