"""nanoVLM checkpoints (huggingface/nanoVLM ``VisionLanguageModel.save_pretrained``: ``config.json``
= its flat ``VLMConfig`` as a dict, ``model.safetensors``) <-> a minivlm :class:`VisionLanguageModel`.

Reference: nanoVLM ``models/vision_transformer.py``, ``modality_projector.py``,
``language_model.py``. The parts map as:

* ``vision_encoder`` (SigLIP layout, fused ``qkv_proj``, tanh GELU, final ``layer_norm`` on the
  features; no class token) -> the ViT encoder, row-major positions;
* ``MP`` (pixel shuffle by ``mp_pixel_shuffle_factor``, bias-free ``proj``) -> ``pixel_shuffle``
  with ``depth=1, bias=False`` (same (row, column, channel) order);
* ``decoder`` (Llama: RMSNorm, rotate-half RoPE with base ``lm_re_base``, GQA, SwiGLU, tied head)
  -> the Llama decoder.

The tokenizer is not in the checkpoint: nanoVLM loads ``lm_tokenizer`` (a hub id) and adds
``vlm_extra_tokens`` as special tokens in order (``<|image|>``, ``<|global_image|>``,
``<row_1_col_1>`` ...); minivlm does the same from the local Hugging Face cache or a given directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from minivlm.config import DecoderConfig, EncoderConfig, FusionConfig, ProjectorConfig, VLMConfig
from minivlm.interop import MappedState, StateMapper, raise_if_unsupported
from minivlm.registry import image_seq_len, image_tokens, validate_config

#: nanoVLM ``VLMConfig`` defaults for the fields minivlm reads (a config.json may predate some).
NANOVLM_DEFAULTS: dict[str, Any] = {
    "vit_ln_eps": 1e-6, "vit_cls_flag": False, "lm_rms_eps": 1e-5, "lm_re_base": 100000,
    "lm_max_position_embeddings": 8192, "lm_tie_weights": True, "lm_attn_scaling": 1.0,
    "max_img_size": 2048, "resize_to_max_side_len": False,
}
_VIT = {"ln1": "norm1", "attn.qkv_proj": "attn.qkv", "attn.out_proj": "attn.proj", "ln2": "norm2",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_LM = {"norm1": "attn_norm", "attn.q_proj": "attn.q", "attn.k_proj": "attn.k", "attn.v_proj": "attn.v",
       "attn.out_proj": "attn.o", "norm2": "mlp_norm", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
       "mlp.down_proj": "mlp.down"}


def vlm_config_from_nanovlm(config: Mapping[str, Any], image_token_id: int = 0) -> VLMConfig:
    """The :class:`VLMConfig` of a nanoVLM ``config.json`` (``image_token_id``: the tokenizer's ``<|image|>``)."""
    c = {**NANOVLM_DEFAULTS, **config}
    problems = []
    required = ("vit_img_size", "vit_patch_size", "vit_hidden_dim", "vit_n_blocks", "vit_n_heads", "vit_inter_dim",
                "lm_vocab_size", "lm_hidden_dim", "lm_n_blocks", "lm_n_heads", "lm_n_kv_heads", "lm_inter_dim",
                "mp_pixel_shuffle_factor")
    lacking = [k for k in required if k not in c]
    if lacking:
        raise ValueError(f"not a nanoVLM config.json: it lacks {lacking}")
    if c["vit_cls_flag"]:
        problems.append("vit_cls_flag=True: the vision tower returns only the class token")
    if c["lm_attn_scaling"] != 1.0:
        problems.append(f"lm_attn_scaling={c['lm_attn_scaling']}: minivlm's RoPE is unscaled")
    raise_if_unsupported("nanoVLM config", problems)
    config = validate_config(VLMConfig(
        name="nanovlm-import",
        encoder=EncoderConfig(image_size=c["vit_img_size"], patch_size=c["vit_patch_size"], width=c["vit_hidden_dim"],
                              depth=c["vit_n_blocks"], n_heads=c["vit_n_heads"], mlp_dim=c["vit_inter_dim"],
                              class_token=False, final_norm=True, feature_norm=True, activation="gelu_tanh",
                              norm_eps=c["vit_ln_eps"], normalization="siglip"),
        projector=ProjectorConfig(kind="pixel_shuffle", shuffle_factor=c["mp_pixel_shuffle_factor"], depth=1, bias=False),
        fusion=FusionConfig(kind="splice"),
        decoder=DecoderConfig(vocab_size=c["lm_vocab_size"], width=c["lm_hidden_dim"], n_layers=c["lm_n_blocks"],
                              n_heads=c["lm_n_heads"], n_kv_heads=c["lm_n_kv_heads"], mlp_dim=c["lm_inter_dim"],
                              rope_theta=float(c["lm_re_base"]), norm_eps=c["lm_rms_eps"],
                              tie_embeddings=bool(c["lm_tie_weights"]), max_seq_len=c["lm_max_position_embeddings"]),
        image_token_id=image_token_id,
    ))
    if "mp_image_token_length" in c and c["mp_image_token_length"] != image_tokens(config):
        raise_if_unsupported("nanoVLM config", [f"mp_image_token_length={c['mp_image_token_length']} but the tower and "
                                                f"pixel shuffle give {image_tokens(config)} tokens per image"])
    return config


def nanovlm_pairs(config: VLMConfig) -> list[tuple[str, str]]:
    """``(nanoVLM key, minivlm key)`` of every tensor (the tied head aside): import and export read this table."""
    pairs = [("vision_encoder.patch_embedding.conv.weight", "encoder.patch_embed.weight"),
             ("vision_encoder.patch_embedding.conv.bias", "encoder.patch_embed.bias"),
             ("vision_encoder.patch_embedding.position_embedding", "encoder.pos_embed"),
             ("vision_encoder.layer_norm.weight", "encoder.norm.weight"),
             ("vision_encoder.layer_norm.bias", "encoder.norm.bias"),
             ("MP.proj.weight", "projector.mlp.0.weight"),
             ("decoder.token_embedding.weight", "decoder.embed.weight"),
             ("decoder.norm.weight", "decoder.norm.weight")]
    for i in range(config.encoder.depth):
        for theirs, ours in _VIT.items():
            pairs += [(f"vision_encoder.blocks.{i}.{theirs}.{p}", f"encoder.blocks.{i}.{ours}.{p}") for p in ("weight", "bias")]
    for i in range(config.decoder.n_layers):
        pairs += [(f"decoder.blocks.{i}.{theirs}.weight", f"decoder.layers.{i}.{ours}.weight") for theirs, ours in _LM.items()]
    if not config.decoder.tie_embeddings:
        pairs.append(("decoder.head.weight", "decoder.lm_head.weight"))
    return pairs


def map_nanovlm_state(state: Mapping[str, Tensor], config: VLMConfig) -> MappedState:
    """Pure key mapping: a nanoVLM state dict -> ``VisionLanguageModel`` keys."""
    state = dict(state)
    if config.decoder.tie_embeddings and "decoder.token_embedding.weight" not in state and "decoder.head.weight" in state:
        # safetensors' save_model keeps one name of a shared tensor; either may survive.
        state["decoder.token_embedding.weight"] = state.pop("decoder.head.weight")
    mapper = StateMapper(state)
    for theirs, ours in nanovlm_pairs(config):
        mapper.move(theirs, ours)
    if config.decoder.tie_embeddings:
        mapper.skip("decoder.head.weight", "tied to decoder.token_embedding.weight (lm_tie_weights)")
    d = config.decoder.resolved_head_dim
    expected = 1.0 / (config.decoder.rope_theta ** (torch.arange(0, d, 2).float() / d))
    mapper.skip("decoder.rotary_embd.inv_freq", "RoPE frequencies, recomputed from lm_re_base",
                lambda t: t.shape == expected.shape and torch.allclose(t.float(), expected, rtol=1e-5))
    return mapper.result()


def nanovlm_processor(config: Mapping[str, Any], model_config: VLMConfig, tokenizer: str | Path | None = None):
    """nanoVLM's tokenizer (``lm_tokenizer`` from the local cache, or ``tokenizer``), image
    processing and template as a minivlm Processor; sets ``model_config.image_token_id``."""
    from minivlm.interop.hf_processor import build_processor, load_hf_tokenizer
    from minivlm.interop.hub import resolve_source
    from minivlm.text.templates import NanoVLMTemplate
    from minivlm.text.templates.nanovlm import NANOVLM_IMAGE_TOKEN
    from minivlm.text.tokenizer_base import IM_END_TOKEN
    from minivlm.vision.nanovlm import NanoVLMImageConfig, NanoVLMImageProcessor

    c = {**NANOVLM_DEFAULTS, **config}
    source = tokenizer if tokenizer is not None else c.get("lm_tokenizer")
    if not source:
        raise ValueError("the nanoVLM config names no lm_tokenizer; pass tokenizer=DIR (--tokenizer DIR)")
    directory = resolve_source("hf", str(source))
    extra = list((c.get("vlm_extra_tokens") or {}).values())
    hf = load_hf_tokenizer(directory, extra, image_token=NANOVLM_IMAGE_TOKEN, end_of_turn_token=IM_END_TOKEN)
    # nanoVLM pads with the eos (get_tokenizer: pad_token = eos_token).
    hf = hf.with_special_tokens([], pad_token=hf.roles.get("eos_token", IM_END_TOKEN))
    model_config.image_token_id = hf.image_token_id
    model_config.validate()
    images = NanoVLMImageProcessor(NanoVLMImageConfig(image_size=c["vit_img_size"], max_side=c["max_img_size"],
                                                      resize_to_max_side=bool(c["resize_to_max_side_len"])))
    return build_processor(directory, model_config, hf, images, NanoVLMTemplate(), image_seq_len(model_config))


def nanovlm_state_from_minivlm(state: Mapping[str, Tensor], config: VLMConfig) -> dict[str, Tensor]:
    """The inverse of :func:`map_nanovlm_state` (a tied head written under both names, as nanoVLM holds it,
    and the persistent RoPE buffer nanoVLM's ``load_model`` expects)."""
    out = {theirs: state[ours] for theirs, ours in nanovlm_pairs(config)}
    if config.decoder.tie_embeddings:
        out["decoder.head.weight"] = out["decoder.token_embedding.weight"]
    d = config.decoder.resolved_head_dim
    out["decoder.rotary_embd.inv_freq"] = 1.0 / (config.decoder.rope_theta ** (torch.arange(0, d, 2).float() / d))
    return out
