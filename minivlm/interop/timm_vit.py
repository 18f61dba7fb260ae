"""timm Vision Transformers (ViT, CLIP-style and SigLIP) -> minivlm :class:`VisionTransformer`.

Reference: timm ``timm/models/vision_transformer.py`` (``VisionTransformer``, ``Block``) and
``timm/layers/attention_pool.py`` (``AttentionPoolLatent``, SigLIP's MAP head). The timm layout
is the one minivlm's encoder was written in, so most keys map one to one::

    patch_embed.proj        -> patch_embed          (conv; bias-free when timm's pre_norm=True)
    cls_token, pos_embed    -> cls_token, pos_embed (pos_embed keeps the class slot)
    norm_pre                -> ln_pre
    blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}  -> identical names
    norm                    -> norm
    attn_pool.*             -> pool_head.*          (latent, q, kv, proj, norm, mlp)
    head.*                  -> not imported: the classifier sits outside the image encoder

Two layout differences are adapted in the weights rather than the module:

* ``no_embed_class=True`` models (DeiT-3, big_vision) add position embeddings to the patches
  *before* prepending the class token. That equals a class slot of zeros in minivlm's
  "concatenate, then add" order, so a zero row is inserted.
* Position embeddings trained for another grid (including a non-square one) are resampled with
  :func:`~minivlm.encoders.vit.resize_pos_embed`, the same bicubic antialiased interpolation
  timm's ``resample_abs_pos_embed`` applies at load time and under ``dynamic_img_size``.

Parity (tests/interop/test_timm_vit.py): timm ``forward_features`` == ``forward_tokens`` and
``forward_head(pre_logits=True)`` == ``pooled``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from minivlm.config import EncoderConfig
from minivlm.encoders.vit import VisionTransformer, resize_pos_embed
from minivlm.interop import MappedState, StateMapper, load_mapped, raise_if_unsupported

#: timm ``global_pool`` -> minivlm ``EncoderConfig.pooling``. timm's "" returns every token from
#: ``forward_head``; minivlm's "none" still averages patches for :meth:`VisionTransformer.pooled`.
_POOLING = {"token": "cls", "avg": "mean", "map": "map", "": "none"}


def normalization_from_stats(mean: Any, std: Any) -> str | None:
    """The name in :data:`minivlm.vision.transforms.NORMALIZATIONS` with these statistics, or None."""
    from minivlm.vision.transforms import NORMALIZATIONS

    if mean is None or std is None:
        return None
    for name, (ref_mean, ref_std) in NORMALIZATIONS.items():
        if all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip((*mean, *std), (*ref_mean, *ref_std))):
            return name
    return None


def create_timm_model_on_meta(name: str, **model_args: Any) -> nn.Module:
    """Build a timm model on the ``meta`` device: its structure without allocating weights.

    Cheap even for huge models; used only to read the layout for :func:`encoder_config_from_timm`.
    """
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **model_args)


def _activation_name(act: nn.Module) -> str | None:
    from timm.layers.activations import GELU, GELUTanh, QuickGELU

    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if isinstance(act, GELU):
        return "gelu"
    if isinstance(act, GELUTanh):
        return "gelu_tanh"
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    return None


def _is_layer_norm(norm: nn.Module) -> bool:
    return isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None


def _block_problems(i: int, block: nn.Module, width: int, activation: str | None) -> list[str]:
    """Everything about timm block ``i`` that minivlm's ``EncoderBlock`` would compute differently."""
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    where = f"blocks.{i}"
    if type(block) is not Block:
        # ResPostBlock, ParallelScalingBlock ... reuse the key names with other arithmetic.
        return [f"{where} is a {type(block).__name__}; only timm's pre-norm Block is supported"]
    problems = []
    attn, mlp = block.attn, block.mlp
    if type(attn) is not Attention:
        problems.append(f"{where}.attn is a {type(attn).__name__}; only timm's Attention is supported")
    else:
        if attn.head_dim * attn.num_heads != width:
            problems.append(f"{where}.attn: head_dim x heads = {attn.head_dim * attn.num_heads} != width {width}")
        if not isinstance(attn.q_norm, nn.Identity):
            problems.append(f"{where}.attn.q_norm/k_norm: QK normalisation (qk_norm=True)")
        if not isinstance(attn.norm, nn.Identity):
            problems.append(f"{where}.attn.norm: attention-output norm (scale_attn_norm=True)")
        if getattr(attn, "gate", None) is not None:  # attribute added in timm 1.0.2x
            problems.append(f"{where}.attn.gate: gated attention")
        if attn.proj.bias is None:
            problems.append(f"{where}.attn.proj has no bias (proj_bias=False)")
    if type(mlp) is not Mlp:
        problems.append(f"{where}.mlp is a {type(mlp).__name__}; only timm's two-layer Mlp is supported")
    else:
        if not isinstance(mlp.norm, nn.Identity):
            problems.append(f"{where}.mlp.norm: MLP norm (scale_mlp_norm=True)")
        if mlp.fc1.bias is None or mlp.fc2.bias is None:
            problems.append(f"{where}.mlp has bias-free linears")
        if _activation_name(mlp.act) != activation:
            problems.append(f"{where}.mlp.act is {type(mlp.act).__name__}, blocks disagree on the activation")
    for name in ("ls1", "ls2"):
        if not isinstance(getattr(block, name), nn.Identity):
            problems.append(f"{where}.{name}: layer scale (init_values)")
    for name in ("norm1", "norm2"):
        if not _is_layer_norm(getattr(block, name)):
            problems.append(f"{where}.{name} is a {type(getattr(block, name)).__name__}, not an affine LayerNorm")
    return problems


def _pool_head_problems(pool: nn.Module, block: nn.Module, qkv_bias: bool) -> list[str]:
    from timm.layers import AttentionPoolLatent

    if type(pool) is not AttentionPoolLatent:
        return [f"attn_pool is a {type(pool).__name__}; only AttentionPoolLatent (SigLIP MAP) is supported"]
    problems = []
    if pool.latent_len != 1 or pool.pool != "token":
        problems.append(f"attn_pool with {pool.latent_len} latents / pool {pool.pool!r}; minivlm has one latent")
    if getattr(pool, "pos_embed", None) is not None:
        problems.append("attn_pool.pos_embed: position embedding inside the pool head")
    if not isinstance(pool.q, nn.Linear) or not isinstance(pool.q_norm, nn.Identity) or pool.mlp is None:
        problems.append("attn_pool without q projection, with qk norm, or without MLP")
    elif (pool.q.bias is not None) != qkv_bias or (pool.kv.bias is not None) != qkv_bias:
        problems.append("attn_pool q/kv bias differs from the blocks' qkv bias")
    elif pool.mlp.fc1.out_features != block.mlp.fc1.out_features:
        problems.append("attn_pool MLP width differs from the blocks' MLP width")
    if not _is_layer_norm(pool.norm):
        problems.append("attn_pool.norm is not an affine LayerNorm")
    return problems


def encoder_config_from_timm(model: nn.Module | str, *, image_size: int | None = None,
                             normalization: str | None = None, **model_args: Any) -> EncoderConfig:
    """Derive the :class:`EncoderConfig` that computes what a timm ViT computes.

    Args:
        model: a timm ``VisionTransformer`` instance, or a timm model name (built on the meta
            device with ``model_args``, so no weights are allocated).
        image_size: the square input size the minivlm encoder is built for; default: timm's.
            When it differs from timm's, the position embeddings are resampled at import.
        normalization: image statistics name; default: read from timm's ``pretrained_cfg``.

    Raises:
        UnsupportedLayoutError: naming every feature minivlm's encoder does not implement
            (register tokens, layer scale, QK norm, ``fc_norm`` after pooling, ...).
    """
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if isinstance(model, str):
        model = create_timm_model_on_meta(model, **model_args)
    source = f"timm {getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)}"
    if type(model) is not TimmViT:
        raise_if_unsupported(source, [f"{type(model).__name__} is not timm's VisionTransformer"])
    problems: list[str] = []

    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d) or not isinstance(pe.norm, nn.Identity):
        problems.append("patch_embed is not a plain convolution (embed norm or another embed layer)")
    patch = tuple(pe.patch_size)
    if patch[0] != patch[1]:
        problems.append(f"non-square patches {patch}")
    grid = tuple(pe.grid_size)
    if image_size is None:
        if grid[0] != grid[1]:
            problems.append(f"non-square input size {tuple(pe.img_size)}: EncoderConfig.image_size is one side; "
                            f"pass image_size= to resample the {grid[0]}x{grid[1]} position grid to a square one")
        image_size = grid[0] * patch[0]
    elif image_size % patch[0]:
        problems.append(f"image_size={image_size} is not a multiple of the patch size {patch[0]}")
    if model.num_reg_tokens:
        problems.append(f"{model.num_reg_tokens} register tokens (reg_tokens)")
    if model.pos_embed is None:
        problems.append("no learned position embedding (pos_embed='none')")
    if not isinstance(model.fc_norm, nn.Identity):
        problems.append("fc_norm: a LayerNorm applied after pooling (timm's default for global_pool='avg'); "
                        "minivlm normalises tokens before pooling. Build the timm model with fc_norm=False, "
                        "or give EncoderConfig a post-pool norm")
    if model.global_pool not in _POOLING:
        problems.append(f"global_pool={model.global_pool!r}; supported: {sorted(_POOLING)}")
    if getattr(model, "pool_include_prefix", False) and model.num_prefix_tokens:
        problems.append("pool_include_prefix=True: pooling over the class token too")
    for name in ("norm_pre", "norm"):
        norm = getattr(model, name)
        if not isinstance(norm, nn.Identity) and not _is_layer_norm(norm):
            problems.append(f"{name} is a {type(norm).__name__}, not an affine LayerNorm")

    first = model.blocks[0]
    width = model.embed_dim
    activation = _activation_name(first.mlp.act) if hasattr(first, "mlp") and hasattr(first.mlp, "act") else None
    if activation is None:
        problems.append(f"MLP activation {type(getattr(getattr(first, 'mlp', None), 'act', None)).__name__} "
                        f"(supported: exact GELU, tanh GELU, QuickGELU)")
    for i, block in enumerate(model.blocks):
        problems += _block_problems(i, block, width, activation)
    raise_if_unsupported(source, problems)

    qkv_bias = first.attn.qkv.bias is not None
    if model.attn_pool is not None:
        raise_if_unsupported(source, _pool_head_problems(model.attn_pool, first, qkv_bias))
    if normalization is None:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        normalization = normalization_from_stats(cfg.get("mean"), cfg.get("std"))
        if normalization is None:
            raise_if_unsupported(source, [f"image statistics mean={cfg.get('mean')} std={cfg.get('std')} match no "
                                          f"minivlm normalization; pass normalization= explicitly"])
    return EncoderConfig(
        image_size=image_size,
        patch_size=patch[0],
        in_channels=pe.proj.in_channels,
        width=width,
        depth=len(model.blocks),
        n_heads=first.attn.num_heads,
        mlp_dim=first.mlp.fc1.out_features,
        class_token=model.cls_token is not None,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not isinstance(model.norm, nn.Identity),
        activation=activation,
        pooling=_POOLING[model.global_pool],
        patch_bias=pe.proj.bias is not None,
        qkv_bias=qkv_bias,
        norm_eps=first.norm1.eps,
        normalization=normalization,
    )


def timm_grid(model: nn.Module) -> tuple[int, int]:
    """The patch grid a timm ViT's position embeddings were built for (may be non-square)."""
    return tuple(model.patch_embed.grid_size)


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def _adapt_pos_embed(pos: Tensor, config: EncoderConfig, source_grid: tuple[int, int] | None) -> Tensor:
    """timm ``pos_embed [1, (1) + h*w, D]`` -> minivlm ``[1, n_prefix + H*W, D]`` (see module docstring).

    A tensor that fits neither layout is returned unchanged, so the loader reports it as a shape
    mismatch together with every other problem.
    """
    n_prefix = 1 if config.class_token else 0
    slots = pos.shape[1]
    if source_grid is None:
        # With a class token the slot is present unless no_embed_class; a square patch count tells which.
        side = (_square_side(slots - n_prefix) if n_prefix else None) or _square_side(slots)
        if side is None:
            return pos
        source_grid = (side, side)
    n_patches = source_grid[0] * source_grid[1]
    if n_prefix and slots == n_patches:
        pos = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    elif slots != n_prefix + n_patches:
        return pos
    return resize_pos_embed(pos, (config.grid_size, config.grid_size), n_prefix, source_grid)


def _pair(mapper: StateMapper, src: str, dst: str, bias: bool = True) -> None:
    mapper.move(f"{src}.weight", f"{dst}.weight")
    if bias:
        mapper.move(f"{src}.bias", f"{dst}.bias")


def map_timm_vit_into(mapper: StateMapper, config: EncoderConfig, src: str = "", dst: str = "",
                      source_grid: tuple[int, int] | None = None) -> None:
    """Add the moves for one timm ViT (keys under ``src``) to ``mapper``, minivlm keys under ``dst``.

    Shared with the open_clip importer, whose SigLIP towers are timm trunks (``visual.trunk.``).
    """
    _pair(mapper, f"{src}patch_embed.proj", f"{dst}patch_embed", bias=config.patch_bias)
    if config.class_token:
        mapper.move(f"{src}cls_token", f"{dst}cls_token")
    mapper.move(f"{src}pos_embed", f"{dst}pos_embed", lambda p: _adapt_pos_embed(p, config, source_grid))
    if config.pre_norm:
        _pair(mapper, f"{src}norm_pre", f"{dst}ln_pre")
    for i in range(config.depth):
        s, d = f"{src}blocks.{i}.", f"{dst}blocks.{i}."
        _pair(mapper, s + "norm1", d + "norm1")
        _pair(mapper, s + "attn.qkv", d + "attn.qkv", bias=config.qkv_bias)
        for name in ("attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            _pair(mapper, s + name, d + name)
    if config.final_norm:
        _pair(mapper, f"{src}norm", f"{dst}norm")
    if config.pooling == "map":
        mapper.move(f"{src}attn_pool.latent", f"{dst}pool_head.latent")
        _pair(mapper, f"{src}attn_pool.q", f"{dst}pool_head.q", bias=config.qkv_bias)
        _pair(mapper, f"{src}attn_pool.kv", f"{dst}pool_head.kv", bias=config.qkv_bias)
        for name in ("proj", "norm", "mlp.fc1", "mlp.fc2"):
            _pair(mapper, f"{src}attn_pool.{name}", f"{dst}pool_head.{name}")


def map_timm_vit_state(state: Mapping[str, Tensor], config: EncoderConfig,
                       source_grid: tuple[int, int] | None = None) -> MappedState:
    """Pure key mapping: a timm ViT state dict -> minivlm encoder keys (relative to the encoder).

    Args:
        state: ``timm_model.state_dict()`` or a timm checkpoint.
        config: from :func:`encoder_config_from_timm`.
        source_grid: the patch grid of ``pos_embed`` (:func:`timm_grid`); inferred when square.

    The classifier ``head.*`` is skipped (logged): it is not part of the image encoder.
    """
    mapper = StateMapper(state)
    map_timm_vit_into(mapper, config, source_grid=source_grid)
    for key in ("head.weight", "head.bias"):
        mapper.skip(key, "timm classifier head; the minivlm image encoder ends at the pooled features")
    return mapper.result()


def load_timm_vit(encoder: VisionTransformer, state: Mapping[str, Tensor], source: str = "timm state dict",
                  source_grid: tuple[int, int] | None = None) -> VisionTransformer:
    """Copy a timm ViT state dict into a minivlm encoder, refusing any unmapped/absent/mismatched key."""
    return load_mapped(encoder, map_timm_vit_state(state, encoder.cfg, source_grid), source)


def encoder_from_timm(model: nn.Module, *, image_size: int | None = None,
                      normalization: str | None = None) -> VisionTransformer:
    """A minivlm encoder computing what the given timm ViT instance computes, with its weights."""
    config = encoder_config_from_timm(model, image_size=image_size, normalization=normalization)
    encoder = VisionTransformer(config)
    name = getattr(model, "pretrained_cfg", {}).get("architecture", "timm model")
    return load_timm_vit(encoder, model.state_dict(), f"timm {name}", timm_grid(model))
