"""Hugging Face Idefics3 / SmolVLM / SmolVLM2 (``Idefics3ForConditionalGeneration``,
``SmolVLMForConditionalGeneration``) <-> a minivlm :class:`VisionLanguageModel`.

Reference: transformers ``models/idefics3/modeling_idefics3.py`` (Laurençon et al. 2024). The
parts map as:

* SigLIP vision tower (``model.vision_model``: bias-full patch conv, learned positions, pre-norm
  blocks with tanh GELU, ``post_layernorm`` applied to the features) -> the ViT encoder with no
  class token and ``feature_norm``; q/k/v are fused into ``qkv``. Patch positions follow
  transformers' bucketised coordinates (``encoder.pos_index=idefics3``).
* ``model.connector.modality_projection.proj`` (pixel shuffle by ``scale_factor``, then one
  bias-free Linear) -> the ``pixel_shuffle`` projector with ``depth=1, bias=False``; both shuffle
  in (row offset, column offset, channel) order.
* ``model.text_model`` + ``lm_head`` (Llama) -> :mod:`minivlm.interop.hf_llama`; fusion ``splice``
  at ``image_token_id``.

Only full-tile views are ever produced (the processor resizes every tile to the encoder size),
so Idefics3's pixel and patch attention masks are all ones and are not modelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from minivlm.config import EncoderConfig, FusionConfig, ProjectorConfig, VLMConfig
from minivlm.interop import MappedState, StateMapper, raise_if_unsupported
from minivlm.interop.hf_llama import decoder_config_from_hf, llama_key_pairs, map_hf_llama_into
from minivlm.interop.vit_pairs import export_pairs, import_pairs, siglip_pairs
from minivlm.registry import image_seq_len, validate_config

MODEL_TYPES = ("idefics3", "smolvlm")
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 16,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
}
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
VISION, CONNECTOR, TEXT = "model.vision_model.", "model.connector.modality_projection.proj.weight", "model.text_model."


def vlm_config_from_idefics3(config: Mapping[str, Any]) -> VLMConfig:
    """The :class:`VLMConfig` of an Idefics3 / SmolVLM ``config.json`` (as a dict).

    Raises:
        UnsupportedLayoutError: naming every feature minivlm cannot represent.
    """
    problems = []
    if config.get("model_type", "idefics3") not in MODEL_TYPES:
        problems.append(f"model_type {config.get('model_type')!r}; expected one of {MODEL_TYPES}")
    vision = {**VISION_DEFAULTS, **(config.get("vision_config") or {})}
    text = dict(config.get("text_config") or {"model_type": "llama"})
    if vision["hidden_act"] not in ACTIVATIONS:
        problems.append(f"vision hidden_act {vision['hidden_act']!r}; supported: {sorted(ACTIVATIONS)}")
    raise_if_unsupported("Hugging Face Idefics3 config", problems)
    tie = bool(config.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
    decoder = decoder_config_from_hf(text, tie_embeddings=tie)
    return validate_config(VLMConfig(
        name="smolvlm-import",
        encoder=EncoderConfig(
            image_size=vision["image_size"], patch_size=vision["patch_size"], in_channels=vision["num_channels"],
            width=vision["hidden_size"], depth=vision["num_hidden_layers"], n_heads=vision["num_attention_heads"],
            mlp_dim=vision["intermediate_size"], class_token=False, pre_norm=False, final_norm=True,
            feature_norm=True, activation=ACTIVATIONS[vision["hidden_act"]], pooling="none", patch_bias=True,
            qkv_bias=True, norm_eps=vision["layer_norm_eps"], normalization="siglip", pos_index="idefics3",
            # SmolVLM's 384 px tiles with 14 px patches: the "valid" conv reads 27 x 14 = 378 px.
            drop_remainder=vision["image_size"] % vision["patch_size"] != 0),
        projector=ProjectorConfig(kind="pixel_shuffle", shuffle_factor=config.get("scale_factor", 2), depth=1,
                                  bias=False),
        fusion=FusionConfig(kind="splice"),
        decoder=decoder,
        image_token_id=config.get("image_token_id", config.get("image_token_index", 128257)),
    ))


def map_idefics3_state(state: Mapping[str, Tensor], config: VLMConfig) -> MappedState:
    """Pure key mapping: an Idefics3 / SmolVLM state dict -> ``VisionLanguageModel`` keys."""
    mapper = StateMapper(state)
    import_pairs(mapper, siglip_pairs(config.encoder.depth, VISION, "encoder."))
    mapper.move(CONNECTOR, "projector.mlp.0.weight")
    map_hf_llama_into(mapper, config.decoder, body=TEXT, head="lm_head.weight", dst="decoder.")
    return mapper.result()


def idefics3_state_from_minivlm(state: Mapping[str, Tensor], config: VLMConfig) -> dict[str, Tensor]:
    """The inverse of :func:`map_idefics3_state`: minivlm keys -> Idefics3 keys (tied head omitted)."""
    out = export_pairs(state, siglip_pairs(config.encoder.depth, VISION, "encoder."), config.encoder.width)
    out[CONNECTOR] = state["projector.mlp.0.weight"]
    for theirs, ours in llama_key_pairs(config.decoder, TEXT, "lm_head.weight"):
        out[theirs] = state[f"decoder.{ours}"]
    return out


def idefics3_config_from_minivlm(config: VLMConfig, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An Idefics3 ``config.json`` dict with ``config``'s shapes (``base``: the imported file, whose
    other fields are kept)."""
    from minivlm.interop.export import hf_llama_config

    e, d = config.encoder, config.decoder
    text = hf_llama_config(d)
    for key in ("architectures", "torch_dtype"):
        text.pop(key)
    vision = {"model_type": "idefics3_vision", "hidden_size": e.width, "intermediate_size": e.mlp_dim,
              "num_hidden_layers": e.depth, "num_attention_heads": e.n_heads, "num_channels": e.in_channels,
              "image_size": e.image_size, "patch_size": e.patch_size, "layer_norm_eps": e.norm_eps,
              "hidden_act": {v: k for k, v in ACTIVATIONS.items() if k != "gelu_new"}[e.activation]}
    out = dict(base or {})
    model_type = out.get("model_type") if out.get("model_type") in MODEL_TYPES else "idefics3"
    architecture = "SmolVLMForConditionalGeneration" if model_type == "smolvlm" else "Idefics3ForConditionalGeneration"
    out.update({"architectures": [architecture], "model_type": model_type,
                "vision_config": {**(out.get("vision_config") or {}), **vision},
                "text_config": {**(out.get("text_config") or {}), **text},
                "scale_factor": config.projector.shuffle_factor, "image_token_id": config.image_token_id,
                "tie_word_embeddings": d.tie_embeddings})
    return out


def idefics3_processor(directory: Any, config: VLMConfig):
    """The :class:`~minivlm.text.processor.Processor` of an Idefics3 / SmolVLM checkpoint directory."""
    from pathlib import Path

    from minivlm.interop.hf_processor import (build_processor, check_template, hf_chat_template, hf_processor_files,
                                              load_hf_tokenizer, resample_name)
    from minivlm.text.templates import Idefics3Template
    from minivlm.text.templates.idefics3 import END_OF_UTTERANCE, FAKE_IMAGE_TOKEN
    from minivlm.text.tokenizer_base import GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN
    from minivlm.vision.idefics3 import Idefics3ImageConfig, Idefics3ImageProcessor

    directory = Path(directory)
    image, settings = hf_processor_files(directory)
    # Idefics3Processor adds these three when the tokenizer lacks them; the tile markers must exist.
    tokenizer = load_hf_tokenizer(directory, [FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE],
                                  image_token=IMAGE_TOKEN, end_of_turn_token=END_OF_UTTERANCE)
    missing = [t for t in (GLOBAL_IMAGE_TOKEN, "<row_1_col_1>") if not tokenizer.has_token(t)]
    if missing:
        raise ValueError(f"{directory}: the tokenizer lacks the Idefics3 layout tokens {missing}")
    tile = (image.get("max_image_size") or {}).get("longest_edge", config.encoder.image_size)
    video = (image.get("video_sampling") or {}).get("video_size") or {}
    image_processor = Idefics3ImageProcessor(Idefics3ImageConfig(
        image_size=tile, longest_edge=(image.get("size") or {}).get("longest_edge", 4 * tile),
        split_image=bool(image.get("do_image_splitting", True)), resample=resample_name(image.get("resample"), "lanczos"),
        image_mean=tuple(image.get("image_mean", (0.5, 0.5, 0.5))), image_std=tuple(image.get("image_std", (0.5, 0.5, 0.5))),
        video_longest_edge=video.get("longest_edge")))
    if tile != config.encoder.image_size:
        raise ValueError(f"{directory}: the image processor makes {tile}px tiles but the vision tower takes "
                         f"{config.encoder.image_size}px images")
    template = Idefics3Template()
    check_template(hf_chat_template(directory), template, str(directory),
                   {"bos_token": tokenizer.roles.get("bos_token", ""), "eos_token": tokenizer.roles.get("eos_token", "")})
    seq_len = settings.get("image_seq_len", image_seq_len(config))
    return build_processor(directory, config, tokenizer, image_processor, template, seq_len)
