"""open_clip visual towers (CLIP ViTs and timm-trunk SigLIP) -> minivlm :class:`VisionTransformer`.

Reference: open_clip ``src/open_clip/transformer.py`` (``VisionTransformer``,
``ResidualAttentionBlock``), ``model.py`` (``_build_vision_tower``) and ``timm_model.py``
(``TimmModel``). An open_clip model is described by a config dict (``model_configs/*.json`` or a
Hub repo's ``open_clip_config.json`` ``model_cfg``), which is what the config function reads.

Native CLIP ViT (OpenAI layout, Radford et al. 2021)::

    conv1 (bias-free)               -> patch_embed
    class_embedding [D]             -> cls_token [1, 1, D]
    positional_embedding [1+P, D]   -> pos_embed [1, 1+P, D]
    ln_pre                          -> ln_pre
    transformer.resblocks.i.ln_1 / ln_2            -> blocks.i.norm1 / norm2
    transformer.resblocks.i.attn.in_proj_{weight,bias} (q;k;v stacked) -> blocks.i.attn.qkv
    transformer.resblocks.i.attn.out_proj          -> blocks.i.attn.proj
    transformer.resblocks.i.mlp.c_fc / c_proj      -> blocks.i.mlp.fc1 / fc2
    ln_post                         -> norm   (applied to every token before pooling)
    proj [D, E] (x @ proj)          -> proj.weight = proj.T (Linear, bias-free)

QuickGELU where the config says ``"quick_gelu": true`` (the OpenAI weights were trained with it;
the plain ``ViT-B-32`` config uses exact GELU). SigLIP (``ViT-B-16-SigLIP``; Zhai et al. 2023) is a
timm trunk (``visual.trunk.*``, mapped by :mod:`minivlm.interop.timm_vit`) with an attention-pool
head and, for ``timm_proj="linear"``, a bias-free ``visual.head.proj``.

Parity (tests/interop/test_open_clip.py): ``encode_image`` == ``pooled`` and the token features
(``output_tokens``) == ``forward_tokens[:, 1:]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from minivlm.config import EncoderConfig
from minivlm.encoders.vit import VisionTransformer, resize_pos_embed
from minivlm.interop import MappedState, StateMapper, load_mapped, raise_if_unsupported
from minivlm.interop.timm_vit import (create_timm_model_on_meta, encoder_config_from_timm, map_timm_vit_into,
                                     normalization_from_stats)

#: OpenAI's CLIP image statistics: open_clip's default when a config names none.
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_POOLING = {"tok": "cls", "avg": "mean"}
#: CLIPVisionCfg flags that switch on a block or head minivlm's encoder does not implement.
_UNSUPPORTED_FLAGS = {
    "ls_init_value": "layer scale (ls_init_value)",
    "attentional_pool": "attentional pooler (CoCa)",
    "final_ln_after_pool": "ln_post after pooling (final_ln_after_pool)",
    "qk_norm": "QK normalisation (qk_norm)",
    "scaled_cosine_attn": "scaled cosine attention",
    "scale_heads": "per-head attention scale (scale_heads)",
    "scale_attn_inner": "attention-inner LayerNorm (scale_attn_inner)",
    "scale_attn": "post-attention LayerNorm (scale_attn)",
    "scale_fc": "MLP LayerNorm (scale_fc)",
}


def open_clip_model_config(name_or_config: str | Mapping[str, Any]) -> dict[str, Any]:
    """An open_clip model config dict: a built-in name (``"ViT-B-32"``) is looked up in open_clip."""
    if not isinstance(name_or_config, str):
        return dict(name_or_config)
    import open_clip

    cfg = open_clip.get_model_config(name_or_config)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {name_or_config!r}; expected one of open_clip.list_models(), "
                         f"e.g. 'ViT-B-32', 'ViT-L-14-336', 'ViT-B-16-SigLIP'")
    return cfg


def is_timm_tower(model_cfg: Mapping[str, Any]) -> bool:
    """True when the visual tower is a timm trunk (SigLIP and other ``timm_model_name`` configs)."""
    return bool(model_cfg.get("vision_cfg", {}).get("timm_model_name"))


def _build_timm_trunk_on_meta(model_cfg: Mapping[str, Any]) -> nn.Module:
    """The timm trunk open_clip's ``TimmModel`` builds, on the meta device (structure only).

    Mirrors ``TimmModel.__init__`` for the two supported heads: ``timm_proj="none"`` builds the
    trunk without classifier; ``"linear"`` builds it whole, then resets the classifier to zero
    classes and the pooling to ``timm_pool`` (the projection lives outside the trunk).
    """
    vision = model_cfg["vision_cfg"]
    pool, proj = vision.get("timm_pool", "avg"), vision.get("timm_proj", "linear")
    if proj == "none":
        return create_timm_model_on_meta(vision["timm_model_name"], num_classes=0, global_pool=pool)
    trunk = create_timm_model_on_meta(vision["timm_model_name"])
    trunk.reset_classifier(0, **({"global_pool": pool} if pool else {}))
    return trunk


def _timm_tower_config(model_cfg: Mapping[str, Any], source: str, image_size: int | None,
                       normalization: str | None) -> EncoderConfig:
    vision = model_cfg["vision_cfg"]
    pool, proj = vision.get("timm_pool", "avg"), vision.get("timm_proj", "linear")
    problems = []
    if pool in ("abs_attn", "rot_attn"):
        problems.append(f"timm_pool={pool!r}: a 2-D attention pool head")
    if proj == "mlp":
        problems.append("timm_proj='mlp': an MLP projection head")
    if proj == "linear" and vision.get("timm_proj_bias", False):
        problems.append("timm_proj_bias=True: minivlm's projection is bias-free")
    if proj not in ("linear", "mlp", "none"):
        problems.append("the timm classifier serves as a biased projection (timm_proj=''); minivlm's is bias-free")
    raise_if_unsupported(source, problems)
    trunk = _build_timm_trunk_on_meta(model_cfg)
    config = encoder_config_from_timm(trunk, image_size=image_size, normalization=normalization)
    if proj == "linear":
        config.embed_dim = model_cfg["embed_dim"]
    return config


def encoder_config_from_open_clip(model: str | Mapping[str, Any], *, image_size: int | None = None,
                                  normalization: str | None = None) -> EncoderConfig:
    """Derive the :class:`EncoderConfig` of an open_clip visual tower from its model config.

    Args:
        model: an open_clip model name (``"ViT-B-32-quickgelu"``) or config dict
            (``{"embed_dim": ..., "vision_cfg": {...}, "quick_gelu": ...}``).
        image_size: build the encoder for another square input size (position embeddings are
            resampled at import); default: the config's.
        normalization: image statistics name; default: the config's ``preprocess_cfg``, else
            OpenAI CLIP's (open_clip's default) or, for timm trunks, timm's ``pretrained_cfg``.

    Raises:
        UnsupportedLayoutError: naming every feature minivlm's encoder does not implement.
    """
    model_cfg = open_clip_model_config(model)
    source = f"open_clip {model if isinstance(model, str) else 'model config'}"
    preprocess = model_cfg.get("preprocess_cfg", {})
    if normalization is None and "mean" in preprocess:
        normalization = normalization_from_stats(preprocess.get("mean"), preprocess.get("std"))
        if normalization is None:
            raise_if_unsupported(source, [f"image statistics {preprocess} match no minivlm normalization; "
                                          f"pass normalization= explicitly"])
    if is_timm_tower(model_cfg):
        return _timm_tower_config(model_cfg, source, image_size, normalization)

    vision = model_cfg["vision_cfg"]
    problems = [text for flag, text in _UNSUPPORTED_FLAGS.items() if vision.get(flag)]
    layers = vision.get("layers", 12)
    if isinstance(layers, (list, tuple)):
        problems.append("a ModifiedResNet tower (layers given per stage); minivlm's encoder is a ViT")
    if vision.get("block_type", "default") not in (None, "default"):
        problems.append(f"block_type={vision['block_type']!r}")
    if vision.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):
        problems.append(f"pos_embed_type={vision['pos_embed_type']!r}")
    pool = vision.get("pool_type", "tok")
    if pool not in _POOLING:
        problems.append(f"pool_type={pool!r}; supported: {sorted(_POOLING)}")
    width, head_width = vision.get("width", 768), vision.get("head_width", 64)
    if width % head_width:
        problems.append(f"width {width} is not a multiple of head_width {head_width}")
    size, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
    if isinstance(size, (list, tuple)):
        if size[0] != size[1] and image_size is None:
            problems.append(f"non-square image_size {tuple(size)}; pass image_size= to resample to a square grid")
        size = size[0]
    if isinstance(patch, (list, tuple)):
        if patch[0] != patch[1]:
            problems.append(f"non-square patch_size {tuple(patch)}")
        patch = patch[0]
    activation = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    act_kwargs = vision.get("act_kwargs") or {}
    if act_kwargs == {"approximate": "tanh"} and activation == "gelu":
        activation = "gelu_tanh"
    elif act_kwargs:
        problems.append(f"act_kwargs={act_kwargs} on {activation}")
    norm_kwargs = dict(vision.get("norm_kwargs") or {})
    norm_eps = norm_kwargs.pop("eps", 1e-5)  # open_clip's LayerNorm is torch's, eps 1e-5
    if norm_kwargs:
        problems.append(f"norm_kwargs={norm_kwargs}")
    raise_if_unsupported(source, problems)
    return EncoderConfig(
        image_size=image_size or size,
        patch_size=patch,
        in_channels=3,
        width=width,
        depth=layers,
        n_heads=width // head_width,
        mlp_dim=int(width * vision.get("mlp_ratio", 4.0)),
        class_token=True,
        pre_norm=not vision.get("no_ln_pre", False),
        final_norm=True,
        activation=activation,
        pooling=_POOLING[pool],
        embed_dim=model_cfg["embed_dim"],
        patch_bias=False,
        qkv_bias=True,
        norm_eps=norm_eps,
        normalization=normalization or normalization_from_stats(_OPENAI_MEAN, _OPENAI_STD),
    )


def _source_grid(model_cfg: Mapping[str, Any]) -> tuple[int, int]:
    vision = model_cfg["vision_cfg"]
    size, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    patch = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
    return size[0] // patch[0], size[1] // patch[1]


def _adapt_pos_embed(pos: Tensor, config: EncoderConfig, grid: tuple[int, int]) -> Tensor:
    """``[1 + h*w, D] -> [1, 1 + H*W, D]``, resampled to the encoder's grid; a tensor that does not
    fit the config's grid is only reshaped, so the loader reports the shape mismatch."""
    pos = pos.unsqueeze(0)
    if pos.shape[1] != 1 + grid[0] * grid[1]:
        return pos
    return resize_pos_embed(pos, (config.grid_size, config.grid_size), 1, grid)


def map_open_clip_visual_state(state: Mapping[str, Tensor], config: EncoderConfig,
                               model: str | Mapping[str, Any]) -> MappedState:
    """Pure key mapping: an open_clip state dict -> minivlm encoder keys (relative to the encoder).

    Args:
        state: a whole open_clip model's state dict (``visual.*`` plus the text tower, whose keys
            are skipped and logged: they are outside the image encoder), or the visual tower's
            own state dict.
        config: from :func:`encoder_config_from_open_clip`.
        model: the same open_clip model name or config dict (it says which layout the keys use).
    """
    model_cfg = open_clip_model_config(model)
    mapper = StateMapper(state)
    src = "visual." if any(k.startswith("visual.") for k in state) else ""
    if is_timm_tower(model_cfg):
        map_timm_vit_into(mapper, config, src=f"{src}trunk.")
        if config.embed_dim:
            mapper.move(f"{src}head.proj.weight", "proj.weight")
    else:
        grid = _source_grid(model_cfg)
        mapper.move(f"{src}conv1.weight", "patch_embed.weight")
        mapper.move(f"{src}class_embedding", "cls_token", lambda t: t.reshape(1, 1, -1))
        mapper.move(f"{src}positional_embedding", "pos_embed", lambda t: _adapt_pos_embed(t, config, grid))
        if config.pre_norm:
            mapper.move(f"{src}ln_pre.weight", "ln_pre.weight")
            mapper.move(f"{src}ln_pre.bias", "ln_pre.bias")
        names = {"ln_1": "norm1", "attn.in_proj": "attn.qkv", "attn.out_proj": "attn.proj", "ln_2": "norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for i in range(config.depth):
            for theirs, ours in names.items():
                s, d = f"{src}transformer.resblocks.{i}.{theirs}", f"blocks.{i}.{ours}"
                # nn.MultiheadAttention names its fused input projection in_proj_weight / in_proj_bias.
                sep = "_" if theirs == "attn.in_proj" else "."
                mapper.move(f"{s}{sep}weight", f"{d}.weight")
                mapper.move(f"{s}{sep}bias", f"{d}.bias")
        mapper.move(f"{src}ln_post.weight", "norm.weight")
        mapper.move(f"{src}ln_post.bias", "norm.bias")
        mapper.move(f"{src}proj", "proj.weight", lambda t: t.t())
    if src:
        mapper.skip_where(lambda k: not k.startswith(src), "outside the vision tower (text tower, logit scale)")
    return mapper.result()


def load_open_clip_visual(encoder: VisionTransformer, state: Mapping[str, Tensor], model: str | Mapping[str, Any],
                          source: str = "open_clip state dict") -> VisionTransformer:
    """Copy an open_clip visual tower into a minivlm encoder, refusing any unmapped/absent/mismatched key."""
    return load_mapped(encoder, map_open_clip_visual_state(state, encoder.cfg, model), source)


def encoder_from_open_clip(clip_model: nn.Module, model: str | Mapping[str, Any], *,
                           image_size: int | None = None) -> VisionTransformer:
    """A minivlm encoder computing what ``clip_model.encode_image`` computes, with its weights.

    ``model`` is the name or config dict ``clip_model`` was created from.
    """
    encoder = VisionTransformer(encoder_config_from_open_clip(model, image_size=image_size))
    name = model if isinstance(model, str) else "model"
    return load_open_clip_visual(encoder, clip_model.state_dict(), model, f"open_clip {name}")
