"""The two backends that always exist: ``math`` (explicit scores, fp32 softmax: the reference every
other kernel is tested against) and ``sdpa`` (PyTorch's ``scaled_dot_product_attention``).

SDPA takes its flash (or cuDNN) kernel only without a mask tensor: plain causal and plain
bidirectional masks are passed as the ``is_causal`` flag (:meth:`AttentionMask.flag_only`); every
other mask becomes the boolean matrix of :meth:`AttentionMask.dense`, built once per mask object
and shared by all layers of a forward (:class:`~minivlm.kernels.mask_cache.PerMaskCache`).

Shapes: ``q [B, Hq, T, Dh]``, ``k, v [B, Hkv, S, Dh]`` -> ``[B, Hq, T, Dh]``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from minivlm.kernels.mask import AttentionMask
from minivlm.kernels.mask_cache import PerMaskCache

__all__ = ["DENSE_MASKS", "attention_weights", "math_attention", "sdpa_attention"]

#: SDPA's boolean matrices per live mask description: one build per forward, not one per layer.
DENSE_MASKS = PerMaskCache(max_entries=8)


def attention_weights(q: Tensor, k: Tensor, mask: AttentionMask, scale: float | None = None) -> Tensor:
    """Softmax attention weights ``[B, Hq, T, S]`` in fp32 (rows with no allowed key are all zero)."""
    Hq, Hkv, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.einsum("bhtd,bhsd->bhts", q.float(), k.float()) * scale
    scores = scores.masked_fill(~mask.dense(T, S, q.device), float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # empty rows (cross-attention) -> 0


def math_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float | None = None, *,
                   weights_hook: Callable[[Tensor], None] | None = None) -> Tensor:
    """Reference attention: explicit scores, fp32 softmax. Returns ``[B, Hq, T, Dh]`` in q's dtype.

    ``weights_hook`` receives the ``[B, Hq, T, S]`` weights (attention maps, ``minivlm.explain``).
    """
    probs = attention_weights(q, k, mask, scale)
    if weights_hook is not None:
        weights_hook(probs)
    if v.shape[1] != q.shape[1]:
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return torch.einsum("bhts,bhsd->bhtd", probs, v.float()).to(q.dtype)


def _dense(mask: AttentionMask, T: int, S: int, device: torch.device) -> Tensor:
    if torch.compiler.is_compiling():
        return mask.dense(T, S, device)  # the compiler sees one expression per layer and merges them
    return DENSE_MASKS.get(mask, (T, S, str(device)), lambda: mask.dense(T, S, device))


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float | None = None) -> Tensor:
    """PyTorch SDPA; flag-only (flash-eligible) when the mask is plain, else a boolean mask.

    On the CPU, bf16 / fp16 inputs that need gradients are attended in fp32: PyTorch's CPU
    flash-attention backward is slower in reduced precision than in fp32 (it converts per block;
    fwd + bwd at the ``tiny`` encoder's shapes, B32 H4 T65 Dh32: 13.9 ms bf16 vs 5.1 ms via fp32,
    2 threads, AVX-512 BF16 EPYC), while autocast still runs every matrix product in bf16.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.requires_grad \
            and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):
            return _sdpa(q.float(), k.float(), v.float(), mask, scale).to(q.dtype)
    return _sdpa(q, k, v, mask, scale)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float | None) -> Tensor:
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    flag = mask.flag_only(T, S)
    if flag is not None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=flag, scale=scale, enable_gqa=gqa)
    allowed = _dense(mask, T, S, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    if mask.is_cross:
        out = out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return out
