"""Hugging Face LLaVA (``LlavaForConditionalGeneration``) -> a whole minivlm :class:`VisionLanguageModel`.

Reference: transformers ``models/llava/modeling_llava.py`` and ``models/clip/modeling_clip.py``
(Liu et al. 2023, "Visual Instruction Tuning" / "Improved Baselines"). The parts map as:

* CLIP vision tower (``CLIPVisionModel``) -> the ViT encoder with ``class_token``, ``pre_norm``
  (CLIP's ``pre_layrnorm``), bias-free patch conv, QuickGELU (``hidden_act``), and
  ``feature_norm=False``: LLaVA takes a hidden state *before* ``post_layernorm``. Separate
  ``q/k/v_proj`` are concatenated into the fused ``qkv``.
* ``vision_feature_layer`` (an index into ``hidden_states``, whose entry 0 is the embedding
  output) -> ``encoder.feature_layer``: ``k > 0`` is block ``k - 1``; ``k < 0`` is the same
  negative block index (-2 = second-to-last block). Strategy ``"default"`` drops the CLS token,
  which minivlm's encoder always does.
* ``multi_modal_projector.linear_1 / linear_2`` (GELU between) -> the ``mlp`` projector
  (``mlp.0`` / ``mlp.2``), hidden width = text width.
* the Llama language model -> :mod:`minivlm.interop.hf_llama`; ``image_token_index`` ->
  ``image_token_id``; fusion ``splice`` (the processor expands ``<image>`` into one placeholder per
  patch and the model scatters projected patches into them, as minivlm's splice does).

Key spellings differ across transformers versions; all are accepted (:func:`canonical_llava_key`):

====================================  ====================================  ==========================
older (< 4.52)                        newer (4.52+)                         v5 save_pretrained
====================================  ====================================  ==========================
``language_model.model.*``            ``model.language_model.*``            ``language_model.model.*``
``language_model.lm_head.weight``     ``lm_head.weight``                    ``language_model.lm_head.weight``
``vision_tower.vision_model.*``       ``model.vision_tower.vision_model.*`` ``vision_tower.*``
``multi_modal_projector.*``           ``model.multi_modal_projector.*``     ``multi_modal_projector.*``
====================================  ====================================  ==========================
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from minivlm.config import EncoderConfig, FusionConfig, ProjectorConfig, VLMConfig
from minivlm.interop import MappedState, StateMapper, load_mapped, raise_if_unsupported
from minivlm.interop.hf_llama import decoder_config_from_hf, load_hf_state, map_hf_llama_into, read_hf_config
from minivlm.interop.vit_pairs import clip_pairs, import_pairs
from minivlm.model import VisionLanguageModel
from minivlm.vision.transforms import CLIP_MEAN, CLIP_STD
from minivlm.registry import validate_config

#: transformers ``CLIPVisionConfig`` defaults for fields a config.json may leave out.
CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
#: What ``LlavaConfig`` fills in when ``vision_config`` is absent (CLIP ViT-L/14-336, LLaVA-1.5's tower).
LLAVA_VISION_DEFAULTS: dict[str, Any] = {
    "model_type": "clip_vision_model", "intermediate_size": 4096, "hidden_size": 1024, "patch_size": 14,
    "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16,
}
#: transformers activation names -> minivlm ``EncoderConfig.activation``.
_CLIP_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                     "gelu_new": "gelu_tanh"}

# Applied in order; each rewrites one historical spelling into the canonical one:
# ``vision_tower.<CLIP keys>``, ``multi_modal_projector.*``, ``language_model.<LlamaModel keys>``, ``lm_head.*``.
_CANONICAL_RULES = (
    (re.compile(r"^model\.(vision_tower|multi_modal_projector|language_model)\."), r"\1."),
    (re.compile(r"^language_model\.model\."), "language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
)


def canonical_llava_key(key: str) -> str:
    """Rewrite any of the LLaVA key spellings (see the module table) into one canonical spelling."""
    for pattern, replacement in _CANONICAL_RULES:
        key = pattern.sub(replacement, key)
    return key


def canonicalize_llava_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict under canonical keys; two source keys that land on one name are an error."""
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    clashes = []
    for key, tensor in state.items():
        canon = canonical_llava_key(key)
        if canon in out:
            clashes.append(f"{origin[canon]} and {key} (both {canon})")
        out[canon], origin[canon] = tensor, key
    if clashes:
        raise ValueError(f"the LLaVA state dict mixes key spellings for the same tensor: {'; '.join(clashes)}")
    return out


def _feature_layer(vision_feature_layer: Any, depth: int, problems: list[str]) -> int:
    """LLaVA's ``hidden_states`` index -> minivlm block index (see the module docstring)."""
    if not isinstance(vision_feature_layer, int):
        problems.append(f"vision_feature_layer={vision_feature_layer!r}: concatenating several layers")
        return -1
    if vision_feature_layer == 0 or vision_feature_layer == -(depth + 1):
        problems.append("vision_feature_layer selects the embedding output, before any block")
        return -1
    if not -(depth + 1) < vision_feature_layer <= depth:
        problems.append(f"vision_feature_layer={vision_feature_layer} is outside the {depth}-layer tower")
        return -1
    return vision_feature_layer - 1 if vision_feature_layer > 0 else vision_feature_layer


def encoder_config_from_hf_clip(vision_config: Mapping[str, Any], feature_layer: int = -1) -> EncoderConfig:
    """Derive the :class:`EncoderConfig` of a Hugging Face ``CLIPVisionConfig`` dict."""
    cfg = {**CLIP_VISION_DEFAULTS, **vision_config}
    problems = []
    if cfg.get("model_type", "clip_vision_model") != "clip_vision_model":
        problems.append(f"vision model_type {cfg['model_type']!r}; expected 'clip_vision_model'")
    if cfg["hidden_act"] not in _CLIP_ACTIVATIONS:
        problems.append(f"vision hidden_act {cfg['hidden_act']!r}; supported: {sorted(_CLIP_ACTIVATIONS)}")
    raise_if_unsupported("Hugging Face CLIP vision config", problems)
    return EncoderConfig(
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        in_channels=cfg["num_channels"],
        width=cfg["hidden_size"],
        depth=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"],
        mlp_dim=cfg["intermediate_size"],
        class_token=True,
        pre_norm=True,
        final_norm=True,
        feature_norm=False,
        activation=_CLIP_ACTIVATIONS[cfg["hidden_act"]],
        pooling="cls",
        feature_layer=feature_layer,
        patch_bias=False,
        qkv_bias=True,
        norm_eps=cfg["layer_norm_eps"],
        normalization="clip",
    )


def vlm_config_from_llava(config: Mapping[str, Any]) -> VLMConfig:
    """Derive the whole :class:`VLMConfig` of a Hugging Face LLaVA ``config.json`` (as a dict).

    Fields the file omits take transformers' ``LlavaConfig`` / ``CLIPVisionConfig`` /
    ``LlamaConfig`` defaults, as ``from_pretrained`` would.

    Raises:
        UnsupportedLayoutError: naming every feature minivlm cannot represent (a non-CLIP tower,
            several feature layers, strategy ``"full"``, a non-GELU projector, ...).
    """
    problems = []
    if config.get("model_type", "llava") != "llava":
        problems.append(f"model_type {config.get('model_type')!r}; expected 'llava'")
    vision = dict(config.get("vision_config") or LLAVA_VISION_DEFAULTS)
    text = dict(config.get("text_config") or {"model_type": "llama"})
    depth = vision.get("num_hidden_layers", CLIP_VISION_DEFAULTS["num_hidden_layers"])
    feature_layer = _feature_layer(config.get("vision_feature_layer", -2), depth, problems)
    if config.get("vision_feature_select_strategy", "default") != "default":
        problems.append("vision_feature_select_strategy 'full' keeps the CLS token; minivlm's encoder drops it")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        problems.append(f"projector_hidden_act {config['projector_hidden_act']!r}; minivlm's MLP projector uses GELU")
    raise_if_unsupported("Hugging Face LLaVA config", problems)

    # LlavaConfig forwards a tie requested by the text config (transformers v5 __post_init__).
    tie = bool(config.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
    decoder = decoder_config_from_hf(text, tie_embeddings=tie)
    image_token_id = config.get("image_token_index", config.get("image_token_id", 32000))
    return validate_config(VLMConfig(
        name="llava-import",
        encoder=encoder_config_from_hf_clip(vision, feature_layer),
        projector=ProjectorConfig(kind="mlp", depth=2, hidden_dim=decoder.width,
                                  bias=bool(config.get("multimodal_projector_bias", True))),
        fusion=FusionConfig(kind="splice"),
        decoder=decoder,
        image_token_id=image_token_id,
    ))


def _is_position_ids(t: Tensor) -> bool:
    return t.ndim == 2 and bool(torch.equal(t[0].long(), torch.arange(t.shape[1])))


def map_hf_clip_vision_into(mapper: StateMapper, config: EncoderConfig, src: str = "", dst: str = "") -> None:
    """Add the moves for a ``CLIPVisionTransformer`` (keys under ``src``, no ``vision_model.``) to ``mapper``."""
    import_pairs(mapper, clip_pairs(config.depth, src, dst))
    # transformers < 4.31 persisted the arange position_ids buffer.
    mapper.skip(f"{src}embeddings.position_ids", "an arange buffer", _is_position_ids)


def map_llava_state(state: Mapping[str, Tensor], config: VLMConfig) -> MappedState:
    """Pure key mapping: a LLaVA state dict in any spelling -> ``VisionLanguageModel`` keys.

    Problems are reported under the canonical spelling (see :func:`canonical_llava_key`).
    """
    mapper = StateMapper(canonicalize_llava_state(state))
    map_hf_clip_vision_into(mapper, config.encoder, "vision_tower.", "encoder.")
    for i, linear in ((0, "linear_1"), (2, "linear_2")):  # nn.Sequential slots of the GELU MLP
        mapper.move(f"multi_modal_projector.{linear}.weight", f"projector.mlp.{i}.weight")
        if config.projector.bias:
            mapper.move(f"multi_modal_projector.{linear}.bias", f"projector.mlp.{i}.bias")
    map_hf_llama_into(mapper, config.decoder, body="language_model.", head="lm_head.weight", dst="decoder.")
    return mapper.result()


def load_llava(model: VisionLanguageModel, state: Mapping[str, Tensor],
               source: str = "LLaVA state dict") -> VisionLanguageModel:
    """Copy a LLaVA state dict into a ``VisionLanguageModel``, refusing any unmapped/absent/mismatched key."""
    return load_mapped(model, map_llava_state(state, model.config), source)


def model_from_llava(directory: str | Path) -> VisionLanguageModel:
    """A ``VisionLanguageModel`` built from a Hugging Face LLaVA checkpoint directory, with its weights."""
    model = VisionLanguageModel(vlm_config_from_llava(read_hf_config(directory)))
    return load_llava(model, load_hf_state(directory), str(directory))


def llava_processor(directory: str | Path, config: VLMConfig):
    """The :class:`~minivlm.text.processor.Processor` of a llava-hf checkpoint directory, or None
    when it ships no tokenizer (a weights-only directory).

    ``tokenizer.json`` is read with its added tokens at their ids (``<image>`` = ``image_token_index``);
    a sentencepiece-only directory gets the ``tokenizer_config.json`` added tokens placed at their
    ids. Images: :class:`~minivlm.vision.llava.LlavaImageProcessor` from ``preprocessor_config.json``.
    """
    from minivlm.interop.hf_processor import (build_processor, check_template, hf_chat_template, hf_processor_files,
                                              load_hf_tokenizer, resample_name)
    from minivlm.text.hf_tokenizer import TOKENIZER_JSON, read_tokenizer_config
    from minivlm.text.templates import LlavaTemplate
    from minivlm.text.tokenizer import TOKENIZER_FILENAME, Tokenizer
    from minivlm.vision.llava import LlavaImageConfig, LlavaImageProcessor

    directory = Path(directory)
    image, settings = hf_processor_files(directory)
    if (directory / TOKENIZER_JSON).is_file():
        eos = read_tokenizer_config(directory).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        tokenizer = load_hf_tokenizer(directory, [], image_token="<image>", end_of_turn_token=eos or "</s>")
    elif (directory / TOKENIZER_FILENAME).is_file():
        added = read_tokenizer_config(directory).get("added_tokens_decoder") or {}
        placed = {int(i): t["content"] for i, t in added.items() if isinstance(t, dict) and "content" in t}
        tokenizer = Tokenizer.from_bytes((directory / TOKENIZER_FILENAME).read_bytes(), placed=placed)
    else:
        return None
    crop = image.get("crop_size") or {}
    crop = crop.get("height", config.encoder.image_size) if isinstance(crop, dict) else int(crop)
    shortest = (image.get("size") or {}).get("shortest_edge", crop)
    image_processor = LlavaImageProcessor(LlavaImageConfig(
        image_size=crop, shortest_edge=shortest, pad_to_square=bool(image.get("do_pad", False)),
        resample=resample_name(image.get("resample"), "bicubic"),
        image_mean=tuple(image.get("image_mean", CLIP_MEAN)), image_std=tuple(image.get("image_std", CLIP_STD))))
    template = LlavaTemplate()
    if getattr(tokenizer, "roles", None) is not None:
        check_template(hf_chat_template(directory), template, str(directory),
                       {"bos_token": tokenizer.roles.get("bos_token", ""),
                        "eos_token": tokenizer.roles.get("eos_token", "")})
    patch = settings.get("patch_size") or config.encoder.patch_size
    seq_len = (crop // patch) ** 2 + settings.get("num_additional_image_tokens", 0)
    if settings.get("vision_feature_select_strategy", "default") == "default" and "num_additional_image_tokens" in settings:
        seq_len -= 1
    return build_processor(directory, config, tokenizer, image_processor, template, seq_len)
