"""Write a minivlm checkpoint back in a published layout: ``smolvlm`` (transformers Idefics3) and
``llava`` (llava-hf), each with its processor files, and ``nanovlm`` (nanoVLM's ``save_pretrained``
layout).

The key tables are the importers' own (:mod:`~minivlm.interop.vit_pairs`,
:func:`~minivlm.interop.nanovlm.nanovlm_pairs`), so import -> export is exact by construction
and tested by loading the export in the original library. A model whose parts the layout cannot
express (another projector, a class token, extra heads...) is refused with every reason listed,
never written approximately. Files are staged in a temporary directory and moved into place.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from minivlm.interop import raise_if_unsupported
from minivlm.interop.convert import SOURCE_NAME, write_staged
from minivlm.model import VisionLanguageModel
from minivlm.registry import image_tokens

log = logging.getLogger(__name__)


def _common_problems(model: VisionLanguageModel) -> list[str]:
    c = model.config
    e, p = c.encoder, c.projector
    problems = []
    checks = [
        (e.class_token, "a class token"), (e.pre_norm, "ln_pre before the blocks"), (not e.final_norm, "no final norm"),
        (not e.feature_norm, "features taken before the final norm"), (e.feature_layer not in (-1, e.depth - 1),
                                                                          f"feature_layer={e.feature_layer}"),
        (e.temporal_patch_size != 1, "temporal patches"), (e.stem != "patch", f"the {e.stem} stem"),
        (e.pos_embed != "learned", f"{e.pos_embed} position embeddings"), (not e.patch_bias, "a bias-free patch conv"),
        (e.pooling == "map" or e.embed_dim is not None, "a pooling head / projection"),
        (p.kind != "pixel_shuffle" or p.depth != 1 or p.bias, "a projector other than pixel shuffle + one bias-free Linear"),
        (c.fusion.kind != "splice", f"{c.fusion.kind} fusion"),
        (getattr(model, "retrieval_head", None) is not None, "a retrieval head"),
    ]
    problems += [f"the encoder has {what}" if what.startswith(("a ", "an ", "no ", "ln_", "temporal", "the ")) else what
                 for bad, what in checks if bad]
    if model.processor is None:
        problems.append("the checkpoint has no processor (tokenizer, image processing, template)")
    return problems


def _json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _write_hf(out: str | Path, state: dict[str, Any], config: dict[str, Any], processor: Any,
              preprocessor: dict[str, Any], processor_config: dict[str, Any]) -> Path:
    """Weights, ``config.json``, the tokenizer, the image and processor settings and the chat
    template, as a transformers model + processor directory holds them (staged, then moved in)."""
    images = processor.image_processor.config
    common = {"do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
              "rescale_factor": 1 / 255, "resample": {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}[images.resample],
              "image_mean": list(images.image_mean), "image_std": list(images.image_std)}

    def write(directory: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
        _json(directory / "config.json", config)
        processor.tokenizer.save_pretrained(directory)
        _json(directory / "preprocessor_config.json", {**common, **preprocessor})
        _json(directory / "processor_config.json", processor_config)
        (directory / "chat_template.jinja").write_text(processor.template.jinja)

    return write_staged(out, write)


def _import_record(directory: Path) -> dict[str, Any]:
    path = directory / SOURCE_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def export_smolvlm(model_dir: str | Path, out: str | Path) -> Path:
    """An ``Idefics3ForConditionalGeneration`` + ``Idefics3Processor`` directory from a minivlm checkpoint."""
    import torch

    from minivlm.encoders.vit import idefics3_position_index
    from minivlm.interop.idefics3 import ACTIVATIONS, idefics3_config_from_minivlm, idefics3_state_from_minivlm
    from minivlm.text.hf_tokenizer import HFTokenizer
    from minivlm.vision.idefics3 import Idefics3ImageProcessor

    model_dir = Path(model_dir)
    model = VisionLanguageModel.from_pretrained(model_dir)
    config, processor = model.config, model.processor
    problems = _common_problems(model)
    e = config.encoder
    if e.activation not in ACTIVATIONS.values():
        problems.append(f"encoder activation {e.activation!r}")
    if e.pos_index != "idefics3" and not torch.equal(idefics3_position_index(e.grid_size), torch.arange(e.n_patches)):
        problems.append(f"row-major patch positions on a {e.grid_size}x{e.grid_size} grid, where Idefics3 reads others")
    if processor is not None:
        if not isinstance(processor.tokenizer, HFTokenizer):
            problems.append("a sentencepiece tokenizer (Idefics3 ships tokenizer.json)")
        if not isinstance(processor.image_processor, Idefics3ImageProcessor):
            problems.append(f"the {type(processor.image_processor).__name__} (Idefics3 splits images its own way)")
        if processor.template.kind != "idefics3":
            problems.append(f"the {processor.template.kind!r} chat template")
    raise_if_unsupported(f"{model_dir} as an Idefics3 checkpoint", problems)
    record = _import_record(model_dir)
    hf_config = idefics3_config_from_minivlm(config, record.get("config") if record.get("importer") == "smolvlm" else None)
    state = idefics3_state_from_minivlm(model.state_dict(), config)
    images = processor.image_processor.config

    written = _write_hf(out, state, hf_config, processor, {
        "image_processor_type": "Idefics3ImageProcessor", "processor_class": "Idefics3Processor", "do_pad": True,
        "do_image_splitting": images.split_image, "max_image_size": {"longest_edge": images.image_size},
        "size": {"longest_edge": images.longest_edge}}, {"image_seq_len": processor.image_seq_len,
                                                         "processor_class": "Idefics3Processor"})
    log.info("exported %s as an Idefics3 checkpoint to %s", model_dir, written)
    return written


def export_nanovlm(model_dir: str | Path, out: str | Path) -> Path:
    """A nanoVLM ``save_pretrained`` directory (``config.json`` + ``model.safetensors``)."""
    from minivlm.interop.nanovlm import NANOVLM_DEFAULTS, nanovlm_state_from_minivlm

    model_dir = Path(model_dir)
    model = VisionLanguageModel.from_pretrained(model_dir)
    config, processor = model.config, model.processor
    problems = _common_problems(model)
    e, d = config.encoder, config.decoder
    if e.activation != "gelu_tanh" or e.pos_index != "grid":
        problems.append("nanoVLM's ViT uses tanh GELU and row-major positions")
    if d.head_dim is not None:
        problems.append("nanoVLM's decoder derives head_dim from the width")
    if processor is not None and processor.template.kind != "nanovlm":
        problems.append(f"the {processor.template.kind!r} chat template")
    raise_if_unsupported(f"{model_dir} as a nanoVLM checkpoint", problems)
    record = _import_record(model_dir)
    base = dict(record.get("config") or {}) if record.get("importer") == "nanovlm" else dict(NANOVLM_DEFAULTS)
    images = processor.image_processor.config
    base.update({
        "vit_hidden_dim": e.width, "vit_inter_dim": e.mlp_dim, "vit_patch_size": e.patch_size,
        "vit_img_size": e.image_size, "vit_n_heads": e.n_heads, "vit_n_blocks": e.depth, "vit_ln_eps": e.norm_eps,
        "vit_cls_flag": False, "lm_hidden_dim": d.width, "lm_inter_dim": d.mlp_dim, "lm_rms_eps": d.norm_eps,
        "lm_re_base": d.rope_theta, "lm_max_position_embeddings": d.max_seq_len, "lm_vocab_size": d.vocab_size,
        "lm_n_heads": d.n_heads, "lm_n_kv_heads": d.n_kv_heads, "lm_n_blocks": d.n_layers,
        "lm_tie_weights": d.tie_embeddings, "mp_pixel_shuffle_factor": config.projector.shuffle_factor,
        "mp_image_token_length": image_tokens(config), "max_img_size": images.max_side,
        "resize_to_max_side_len": images.resize_to_max_side, "vlm_load_backbone_weights": False})
    state = nanovlm_state_from_minivlm(model.state_dict(), config)
    if d.tie_embeddings:
        state.pop("decoder.head.weight")  # one name per shared tensor, as safetensors' save_model writes it

    def write(directory: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
        _json(directory / "config.json", base)

    return write_staged(out, write)


def export_llava(model_dir: str | Path, out: str | Path) -> Path:
    """A ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` directory (keys as llava-hf checkpoints spell them)."""
    from minivlm.interop.export import hf_llama_config
    from minivlm.interop.hf_llama import llama_key_pairs
    from minivlm.interop.llava import _CLIP_ACTIVATIONS
    from minivlm.interop.vit_pairs import clip_pairs, export_pairs
    from minivlm.text.hf_tokenizer import HFTokenizer
    from minivlm.vision.llava import LlavaImageProcessor

    model_dir = Path(model_dir)
    model = VisionLanguageModel.from_pretrained(model_dir)
    config, processor = model.config, model.processor
    e, p, d = config.encoder, config.projector, config.decoder
    problems = []
    checks = [(not e.class_token, "no class token"), (not e.pre_norm, "no ln_pre"), (e.patch_bias, "a patch bias"),
              (e.feature_norm, "features after the final norm (LLaVA reads a block's output)"),
              (e.stem != "patch" or e.pos_embed != "learned" or e.temporal_patch_size != 1, "another patch embedding"),
              (e.embed_dim is not None or e.pooling == "map", "a pooling head / projection"),
              (p.kind != "mlp" or p.depth != 2 or (p.hidden_dim or d.width) != d.width, "a projector other than mlp2x_gelu"),
              (config.fusion.kind != "splice", f"{config.fusion.kind} fusion"), (model.processor is None, "no processor")]
    problems += [what for bad, what in checks if bad]
    if processor is not None and not (isinstance(processor.tokenizer, HFTokenizer)
                                      and isinstance(processor.image_processor, LlavaImageProcessor)
                                      and processor.template.kind == "llava"):
        problems.append("a processor other than llava-hf's (tokenizer.json, LLaVA image processing, LLaVA template)")
    raise_if_unsupported(f"{model_dir} as a LLaVA checkpoint", problems)
    text = hf_llama_config(d)
    for key in ("architectures", "torch_dtype"):
        text.pop(key)
    hf_config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": text,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": e.width, "intermediate_size": e.mlp_dim,
                          "num_hidden_layers": e.depth, "num_attention_heads": e.n_heads, "num_channels": e.in_channels,
                          "image_size": e.image_size, "patch_size": e.patch_size, "layer_norm_eps": e.norm_eps,
                          "projection_dim": e.width,
                          "hidden_act": {v: k for k, v in _CLIP_ACTIVATIONS.items() if k != "gelu_new"}[e.activation]},
        "image_token_index": config.image_token_id, "vision_feature_select_strategy": "default",
        # minivlm counts blocks from 0; transformers' hidden_states start with the embeddings.
        "vision_feature_layer": e.feature_layer + 1 if e.feature_layer >= 0 else e.feature_layer,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": p.bias, "tie_word_embeddings": d.tie_embeddings}
    own = model.state_dict()
    state = export_pairs(own, clip_pairs(e.depth, "vision_tower.vision_model.", "encoder."), e.width)
    for index, linear in ((0, "linear_1"), (2, "linear_2")):
        for kind in ("weight", "bias") if p.bias else ("weight",):
            state[f"multi_modal_projector.{linear}.{kind}"] = own[f"projector.mlp.{index}.{kind}"]
    for theirs, ours in llama_key_pairs(d, "language_model.model.", "language_model.lm_head.weight"):
        state[theirs] = own[f"decoder.{ours}"]
    images = processor.image_processor.config

    return _write_hf(out, state, hf_config, processor, {
        "image_processor_type": "LlavaImageProcessor", "processor_class": "LlavaProcessor", "do_center_crop": True,
        "do_pad": images.pad_to_square, "size": {"shortest_edge": images.shortest_edge},
        "crop_size": {"height": images.image_size, "width": images.image_size}}, {
        "processor_class": "LlavaProcessor", "patch_size": e.patch_size, "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1, "image_token": processor.tokenizer.image_token})


EXPORTERS: dict[str, Callable[[str | Path, str | Path], Path]] = {
    "smolvlm": export_smolvlm, "llava": export_llava, "nanovlm": export_nanovlm}
EXPORT_KINDS = tuple(EXPORTERS)


def export_checkpoint(kind: str, model_dir: str | Path, out: str | Path) -> Path:
    """Export ``model_dir`` (a minivlm checkpoint) as ``kind``'s published layout into ``out``."""
    if kind not in EXPORTERS:
        raise ValueError(f"unknown export kind {kind!r}; expected one of {list(EXPORT_KINDS)}")
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a minivlm checkpoint (no config.json)")
    return EXPORTERS[kind](model_dir, out)
