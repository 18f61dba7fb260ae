"""FlexAttention backend for the VLM mask family (``torch.nn.attention.flex_attention``).

FlexAttention (PyTorch 2.5+; Dong et al., "Flex Attention: A Programming Model for Generating
Optimized Attention Kernels", 2024) compiles a ``mask_mod(b, h, q_idx, kv_idx) -> bool`` into a
fused kernel and skips tiles that a ``BlockMask`` marks empty. :func:`vlm_mask_mod` expresses
:class:`~minivlm.kernels.mask.AttentionMask`'s rule as such a function, reading the small
per-token vectors; no ``[T, S]`` matrix is built (on CUDA the ``BlockMask`` is built by a
compiled, chunked pass).

Caching: building a ``BlockMask`` evaluates the mask on every tile, so it is done once per mask
description and reused by every layer of the forward (see
:class:`~minivlm.kernels.mask_cache.PerMaskCache` for keying and invalidation: object identity,
in-place tensor versions, and ``(B, T, S, device)``).

Compilation: on CUDA the kernel is ``torch.compile(flex_attention)``; without compilation flex
materialises the score matrix. On CPU the eager path is used: compiling flex for CPU generates
and builds C++ for minutes per shape, and the CPU backend is here for correctness checks and
small runs only (PyTorch implements its backward on CUDA only).

Rows that allow nothing: :meth:`AttentionMask.dense` gives such causal rows their own position as
the only key; flex returns 0 for them, so their output is patched to ``v[q_pos]`` afterwards
(only when a padding mask can produce empty rows).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from minivlm.kernels.mask import AttentionMask, check_attention_inputs
from minivlm.kernels.mask_cache import PerMaskCache

try:  # torch >= 2.9 replaces ``return_lse=True`` with ``return_aux=AuxRequest(lse=True)``.
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - depends on the installed torch
    AuxRequest = None  # type: ignore[assignment,misc]

__all__ = ["vlm_mask_mod", "block_mask_for", "flex_attention_backend", "BLOCK_MASKS"]

logger = logging.getLogger(__name__)

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

#: Block masks per live mask description; one forward builds one and all layers reuse it.
BLOCK_MASKS = PerMaskCache(max_entries=32)


def vlm_mask_mod(mask: AttentionMask, batch: int) -> MaskMod:
    """The :class:`AttentionMask` rule as a FlexAttention ``mask_mod``.

    ``allowed(b, q, k) = key_valid[b, k] & doc[b, q'] == doc[b, k] & (branch[b, k] == 0 | branch[b, k] == branch[b, q'])
    & (k <= q' | span[b, q'] == span[b, k] != 0)``
    with ``q' = q + q_offset`` and the causal term only for causal masks. The closure captures the
    mask's tensors expanded to ``[batch, S]`` (never the mask object, so caching stays weak).
    """
    if mask.is_cross:
        raise ValueError("vlm_mask_mod expresses the self-attention family; got a cross-attention mask")
    q_offset = mask.q_offset
    causal = mask.causal

    def expand(values: Tensor | None) -> Tensor | None:
        return None if values is None else values.expand(batch, values.shape[-1])

    key_valid = expand(mask.key_valid)
    key_valid = None if key_valid is None else key_valid.bool()
    document_ids = expand(mask.document_ids)
    span_ids = expand(mask.span_ids) if causal else None  # spans only widen a causal mask
    branch_ids = expand(mask.branch_ids)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_pos = q_idx + q_offset
        allowed = kv_idx >= 0
        if causal:
            visible = kv_idx <= q_pos
            if span_ids is not None:
                span_q = span_ids[b, q_pos]
                visible = visible | ((span_q == span_ids[b, kv_idx]) & (span_q != 0))
            allowed = allowed & visible
        if document_ids is not None:
            allowed = allowed & (document_ids[b, q_pos] == document_ids[b, kv_idx])
        if branch_ids is not None:
            branch_k = branch_ids[b, kv_idx]
            allowed = allowed & ((branch_k == 0) | (branch_k == branch_ids[b, q_pos]))
        if key_valid is not None:
            allowed = allowed & key_valid[b, kv_idx]
        return allowed

    return mask_mod


def block_mask_for(mask: AttentionMask, batch: int, T: int, S: int, device: torch.device) -> BlockMask:
    """The (cached) ``BlockMask`` of ``mask`` for ``[batch, *, T, *]`` queries and ``S`` keys.

    The block mask has batch 1 when the mask has no per-row tensors (plain causal with an
    offset), so it is shared by the whole batch; heads always share it (``H=None``).
    """

    def build() -> BlockMask:
        has_rows = any(t is not None for t in (mask.key_valid, mask.document_ids, mask.span_ids, mask.branch_ids))
        mask_batch = batch if has_rows else 1
        logger.debug("building flex BlockMask for %s mask, B=%d T=%d S=%d", mask.kind, mask_batch, T, S)
        return create_block_mask(
            vlm_mask_mod(mask, mask_batch), mask_batch, None, T, S, device=device, _compile=device.type == "cuda"
        )

    return BLOCK_MASKS.get(mask, (batch, T, S, str(device)), build)


@functools.cache
def _compiled_flex_attention() -> Callable[..., object]:
    return torch.compile(flex_attention, dynamic=False)


def _run_flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float, gqa: bool) -> tuple[Tensor, Tensor]:
    """Flex attention returning ``(out [B, Hq, T, Dh], lse [B, Hq, T])``."""
    aux = {"return_aux": AuxRequest(lse=True)} if AuxRequest is not None else {"return_lse": True}
    if q.is_cuda:
        result = _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, **aux)
    else:
        with warnings.catch_warnings():
            # The eager (unfused) path is the deliberate CPU choice; see the module docstring.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            result = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, **aux)
    out, aux_out = result
    lse = aux_out.lse if AuxRequest is not None else aux_out
    return out, lse


def _validate(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> None:
    if mask.is_cross:
        raise ValueError(
            "flex attention implements the self-attention mask family only; got a cross-attention "
            "mask (images_seen/key_image_ids): use backend 'sdpa' or 'math'"
        )
    check_attention_inputs(q, k, v, mask)


def flex_attention_backend(
    q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float | None = None
) -> Tensor:
    """FlexAttention under a self-attention :class:`AttentionMask`.

    Same contract as :func:`minivlm.kernels.reference.math_attention`: ``q [B, Hq, T, Dh]``,
    ``k, v [B, Hkv, S, Dh]`` (GQA through ``enable_gqa``, K/V not repeated) -> ``[B, Hq, T, Dh]``.
    Differentiable on CUDA; forward only on CPU.

    Raises:
        ValueError: cross-attention mask, bad shapes, mask tensors of the wrong shape.
    """
    _validate(q, k, v, mask)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    block_mask = block_mask_for(mask, B, T, S, q.device)
    out, lse = _run_flex(q, k, v, block_mask, scale, gqa=Hq != Hkv)
    if mask.causal and T <= S and mask.key_valid is not None:
        # Empty causal rows (padding queries) attend to their own position (AttentionMask.dense).
        q_pos = torch.arange(mask.q_offset, mask.q_offset + T, device=q.device)
        has_diagonal = q_pos < S
        own_value = v.index_select(2, q_pos.clamp(max=S - 1)).repeat_interleave(Hq // Hkv, dim=1)
        empty_row = (lse == float("-inf")) & has_diagonal
        out = torch.where(empty_row[..., None], own_value.to(out.dtype), out)
    return out

