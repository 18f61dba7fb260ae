"""Key tables of Hugging Face ViT towers (SigLIP, CLIP) against minivlm's encoder, read both ways.

One table per layout is the single source of truth of an import (:func:`import_pairs`) and of an
export (:func:`export_pairs`): ``((foreign keys...), minivlm key)``, where three foreign keys
(q, k, v) are concatenated along dim 0 into the fused ``qkv``, the position table gains a leading
batch dim (``[N, D] -> [1, N, D]``) and a CLIP class embedding becomes ``[1, 1, D]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from minivlm.interop import StateMapper

Pairs = list[tuple[tuple[str, ...], str]]


def block_pairs(depth: int, src: str, dst: str) -> Pairs:
    """The transformer blocks (``encoder.layers.i`` -> ``blocks.i``), shared by SigLIP and CLIP."""
    pairs: Pairs = []
    for i in range(depth):
        s, d = f"{src}encoder.layers.{i}.", f"{dst}blocks.{i}."
        for p in ("weight", "bias"):
            pairs.append((tuple(f"{s}self_attn.{x}_proj.{p}" for x in "qkv"), f"{d}attn.qkv.{p}"))
            for theirs, ours in (("self_attn.out_proj", "attn.proj"), ("layer_norm1", "norm1"),
                                 ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                pairs.append(((f"{s}{theirs}.{p}",), f"{d}{ours}.{p}"))
    return pairs


def _norm(theirs: str, ours: str, src: str, dst: str) -> Pairs:
    return [((f"{src}{theirs}.{p}",), f"{dst}{ours}.{p}") for p in ("weight", "bias")]


def siglip_pairs(depth: int, src: str, dst: str) -> Pairs:
    """SigLIP / Idefics3 vision tower: bias-full patch conv, learned positions, ``post_layernorm``."""
    pairs: Pairs = [((f"{src}embeddings.patch_embedding.{p}",), f"{dst}patch_embed.{p}") for p in ("weight", "bias")]
    pairs.append(((f"{src}embeddings.position_embedding.weight",), f"{dst}pos_embed"))
    return pairs + block_pairs(depth, src, dst) + _norm("post_layernorm", "norm", src, dst)


def clip_pairs(depth: int, src: str, dst: str) -> Pairs:
    """CLIP vision tower: class embedding, bias-free patch conv, ``pre_layrnorm`` (sic), ``post_layernorm``."""
    pairs: Pairs = [((f"{src}embeddings.class_embedding",), f"{dst}cls_token"),
                    ((f"{src}embeddings.patch_embedding.weight",), f"{dst}patch_embed.weight"),
                    ((f"{src}embeddings.position_embedding.weight",), f"{dst}pos_embed")]
    pairs += _norm("pre_layrnorm", "ln_pre", src, dst)
    return pairs + block_pairs(depth, src, dst) + _norm("post_layernorm", "norm", src, dst)


def import_pairs(mapper: StateMapper, pairs: Pairs) -> None:
    """Add the moves of ``pairs`` to ``mapper`` (foreign -> minivlm)."""
    for theirs, ours in pairs:
        if len(theirs) == 3:
            mapper.fuse(theirs, ours)
        elif ours.endswith("cls_token"):
            mapper.move(theirs[0], ours, lambda t: t.reshape(1, 1, -1))
        elif ours.endswith("pos_embed"):
            mapper.move(theirs[0], ours, lambda t: t.unsqueeze(0))
        else:
            mapper.move(theirs[0], ours)


def export_pairs(state: Mapping[str, Tensor], pairs: Pairs, width: int) -> dict[str, Tensor]:
    """The foreign tensors of ``pairs`` from a minivlm state (minivlm -> foreign)."""
    out: dict[str, Tensor] = {}
    for theirs, ours in pairs:
        tensor = state[ours]
        if len(theirs) == 3:
            out.update(zip(theirs, torch.split(tensor, width, dim=0)))
        elif ours.endswith(("cls_token", "pos_embed")):
            out[theirs[0]] = tensor.reshape(-1) if ours.endswith("cls_token") else tensor[0]
        else:
            out[theirs[0]] = tensor
    return out
