"""FlashAttention-2 in Triton for the VLM mask family, forward and backward.

Algorithm: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning" (2023), Algorithms 1 (forward) and 2 (backward); the loop structure follows the
Triton fused-attention tutorial (``python/tutorials/06-fused-attention.py``). Written from scratch
for minivlm's :class:`~minivlm.kernels.mask.AttentionMask`:

* **Mask inside the kernel.** Each score tile is masked from the per-token vectors
  (``document_ids``, ``span_ids``, ``key_valid``), ``q_offset`` and ``causal``; no ``[T, S]``
  matrix exists anywhere. The rule is the one of :meth:`AttentionMask.dense`, including its
  fallback for causal rows that allow nothing (padding queries attend to their own position).
* **Block skipping.** A tiny torch pre-pass (:func:`block_tiles`, O(B * T/BM * S/BN)) classifies
  each (query block, key block) tile from per-block min/max document ids, min/max image-span ids,
  the causal frontier and "any / all keys valid": *dead* (no allowed pair: never visited),
  *partial* (the mask is evaluated) or *full* (every pair allowed: the mask is skipped, as in
  FlexAttention). The kernels loop over compact lists of live blocks (the layout of
  FlexAttention's ``BlockMask``), so packed documents cost the block diagonal, not the causal
  triangle. The pre-pass is memoised per mask object
  (:class:`~minivlm.kernels.mask_cache.PerMaskCache`): all layers of one forward share it.
* **Grouped-query attention** without repeating K/V: query head ``h`` reads kv head
  ``h // (Hq // Hkv)``. The dK/dV kernel owns one kv head and loops over its query heads, so the
  group reduction happens in registers, without atomics.
* **Numerics.** Scores, running max / sum and all accumulators are fp32; inputs may be fp32, bf16
  or fp16. The softmax runs in base 2 (``exp2`` with ``scale * log2(e)`` folded into the scores);
  the saved log-sum-exp is in those base-2 units. fp32 inputs use IEEE fp32 dots (no TF32), so the
  fp32 path matches the math reference to ~1e-6.

Shapes: ``q [B, Hq, T, Dh]``, ``k, v [B, Hkv, S, Dh]``, head dims 16..128 (non powers of two are
padded inside the kernel by masked loads).

CPU: Triton's interpreter runs these kernels on CPU tensors when ``TRITON_INTERPRET=1`` is set
before triton is first imported (slow; for tests). The interpreter (triton 3.x) multiplies bf16
tiles as raw uint16 bits, so under the interpreter dot operands are upcast to fp32 first; this
is exact, as the GPU tensor cores also accumulate bf16 products in fp32.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from minivlm.kernels.mask import AttentionMask, check_attention_inputs
from minivlm.kernels.mask_cache import PerMaskCache

try:  # the interpreter class moved between Triton releases; absence just means "compiled".
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - depends on the installed Triton
    InterpretedFunction = ()  # type: ignore[assignment,misc]

__all__ = [
    "INTERPRETED",
    "INTERPRETER_READY",
    "MIN_HEAD_DIM",
    "MAX_HEAD_DIM",
    "SUPPORTED_DTYPES",
    "KernelConfig",
    "BlockSchedule",
    "block_tiles",
    "block_visit_mask",
    "kernel_configs",
    "triton_attention",
]

logger = logging.getLogger(__name__)

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2_E = 1.4426950408889634


# =========================================================================================
# Kernels
# =========================================================================================
@triton.jit
def _dot(a, b, FP32_OPERANDS: tl.constexpr, PRECISION: tl.constexpr):
    """``a @ b`` with an fp32 accumulator; fp32 operands under the interpreter (see module doc)."""
    if FP32_OPERANDS:
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    else:
        result = tl.dot(a, b, input_precision=PRECISION)
    return result


@triton.jit
def _load_token_vector(ptr, positions, in_range, PRESENT: tl.constexpr):
    """Per-token mask vector at ``positions``.

    When the mask does not use the vector, ``positions`` come back as a placeholder that
    :func:`_allowed` never reads (its flag is off); this costs no load and no instruction.
    """
    if PRESENT:
        values = tl.load(ptr + positions, mask=in_range, other=0)
    else:
        values = positions
    return values


@triton.jit
def _allowed(
    q_pos, k_pos, q_in, k_in, doc_q, doc_k, span_q, span_k, valid_k,
    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_SPAN: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
):
    """The mask rule of :class:`AttentionMask` on one tile (arguments pre-broadcast to the tile).

    ``allowed = key_valid[j] & doc[i] == doc[j] & (j <= i | span[i] == span[j] != 0)`` with ``i``
    the absolute query position; the causal term applies only to causal masks.
    """
    allowed = q_in & k_in
    if CAUSAL:
        visible = k_pos <= q_pos
        if HAS_SPAN:
            visible = visible | ((span_q == span_k) & (span_q != 0))
        allowed = allowed & visible
    if HAS_DOC:
        allowed = allowed & (doc_q == doc_k)
    if HAS_KEY_VALID:
        allowed = allowed & (valid_k != 0)
    return allowed


@triton.jit
def _forward_tile(
    acc, row_max, row_sum,
    q, q_pos, q_in, doc_q, span_q,
    k_t_tile, v_tile, token_base, DocIds, SpanIds, KeyValid,
    start_n, offs_n0, d_in, S, stride_ks, stride_vs, scale_log2,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_SPAN: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr, FP32_OPERANDS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One FA2 forward step over the key block at ``start_n`` (mask evaluated only when MASKED)."""
    offs_n = start_n + offs_n0
    k_in = offs_n < S
    k_t = tl.load(k_t_tile + start_n * stride_ks, mask=d_in[:, None] & k_in[None, :], other=0.0)
    scores = _dot(q, k_t, FP32_OPERANDS, PRECISION) * scale_log2
    if MASKED:
        doc_k = _load_token_vector(DocIds + token_base, offs_n, k_in, HAS_DOC)
        span_k = _load_token_vector(SpanIds + token_base, offs_n, k_in, HAS_SPAN)
        valid_k = _load_token_vector(KeyValid + token_base, offs_n, k_in, HAS_KEY_VALID)
        allowed = _allowed(
            q_pos[:, None], offs_n[None, :], q_in[:, None], k_in[None, :],
            doc_q[:, None], doc_k[None, :], span_q[:, None], span_k[None, :], valid_k[None, :],
            CAUSAL, HAS_DOC, HAS_SPAN, HAS_KEY_VALID,
        )
        scores = tl.where(allowed, scores, float("-inf"))

    new_max = tl.maximum(row_max, tl.max(scores, 1))
    # Rows with no allowed key so far keep max -inf; shift by 0 there so exp2 sees -inf, not nan.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    probs = tl.exp2(scores - shift[:, None])
    correction = tl.exp2(row_max - shift)
    row_sum = row_sum * correction + tl.sum(probs, 1)
    v = tl.load(v_tile + start_n * stride_vs, mask=k_in[:, None] & d_in[None, :], other=0.0)
    acc = acc * correction[:, None] + _dot(probs.to(v.dtype), v, FP32_OPERANDS, PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _attention_forward_kernel(
    Q, K, V, Out, LSE,
    DocIds, SpanIds, KeyValid,
    PartialCount, FullCount, KvIndex,
    scale_log2,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_token_b,
    stride_count_b, stride_index_b, stride_index_m,
    n_q_heads, group_size, T, S, q_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_SPAN: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
    DIAG_FALLBACK: tl.constexpr, FP32_OPERANDS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program = one block of ``BLOCK_M`` queries of one (batch, query head).

    FA2 Algorithm 1: stream the live key blocks (partial tiles with the mask, then full tiles
    without), keep the running row max ``m`` and row sum ``l`` of ``exp2(s - m)`` in fp32, rescale
    the output accumulator when the max grows, divide once at the end. Writes
    ``Out [B, Hq, T, Dh]`` and ``LSE [B, Hq, T]`` (base 2; +inf for rows that see no key, which the
    backward reads as "probability 0 everywhere").
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = (pid_bh % n_q_heads).to(tl.int64)
    kv_h = h // group_size

    # Offsets are int64: no overflow on large tensors (and no overflow checks in the interpreter).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n0 = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_in = offs_d < HEAD_DIM
    q_in = offs_m < T
    q_pos = offs_m + q_offset
    q_pos_in = q_in & (q_pos < S)

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=q_in[:, None] & d_in[None, :], other=0.0,
    )
    token_base = b * stride_token_b
    doc_q = _load_token_vector(DocIds + token_base, q_pos, q_pos_in, HAS_DOC)
    span_q = _load_token_vector(SpanIds + token_base, q_pos, q_pos_in, HAS_SPAN)

    # K is read transposed ([BLOCK_D, BLOCK_N]) so the score tile is a plain q @ k_t.
    k_t_tile = K + b * stride_kb + kv_h * stride_kh + offs_n0[None, :] * stride_ks + offs_d[:, None] * stride_kd
    v_base = V + b * stride_vb + kv_h * stride_vh
    v_tile = v_base + offs_n0[:, None] * stride_vs + offs_d[None, :] * stride_vd

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_partial = tl.load(PartialCount + b * stride_count_b + pid_m)
    n_full = tl.load(FullCount + b * stride_count_b + pid_m)
    index_base = KvIndex + b * stride_index_b + pid_m * stride_index_m
    for i in range(0, n_partial):
        start_n = tl.load(index_base + i).to(tl.int64) * BLOCK_N
        acc, row_max, row_sum = _forward_tile(
            acc, row_max, row_sum, q, q_pos, q_in, doc_q, span_q,
            k_t_tile, v_tile, token_base, DocIds, SpanIds, KeyValid,
            start_n, offs_n0, d_in, S, stride_ks, stride_vs, scale_log2,
            True, CAUSAL, HAS_DOC, HAS_SPAN, HAS_KEY_VALID, FP32_OPERANDS, PRECISION,
        )
    for i in range(n_partial, n_partial + n_full):
        start_n = tl.load(index_base + i).to(tl.int64) * BLOCK_N
        acc, row_max, row_sum = _forward_tile(
            acc, row_max, row_sum, q, q_pos, q_in, doc_q, span_q,
            k_t_tile, v_tile, token_base, DocIds, SpanIds, KeyValid,
            start_n, offs_n0, d_in, S, stride_ks, stride_vs, scale_log2,
            False, CAUSAL, HAS_DOC, HAS_SPAN, HAS_KEY_VALID, FP32_OPERANDS, PRECISION,
        )

    has_keys = row_sum > 0.0
    out = acc / tl.where(has_keys, row_sum, 1.0)[:, None]
    lse = tl.where(has_keys, row_max + tl.log2(tl.where(has_keys, row_sum, 1.0)), float("inf"))
    if DIAG_FALLBACK:
        # AttentionMask.dense gives an empty causal row its own position as the only key, so the
        # output is v[q_pos]; the backward adds the matching dV term (see the dK/dV kernel).
        use_diag = (~has_keys) & q_pos_in
        v_diag = tl.load(
            v_base + q_pos[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            mask=use_diag[:, None] & d_in[None, :], other=0.0,
        )
        out = tl.where(use_diag[:, None], v_diag.to(tl.float32), out)

    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty), mask=q_in[:, None] & d_in[None, :],
    )
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=q_in)


@triton.jit
def _attention_backward_delta_kernel(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    n_q_heads, T,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """FA2 backward preprocessing: ``delta = rowsum(dO * O)`` in fp32, ``[B, Hq, T]``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = (pid_bh % n_q_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    tile_in = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    out = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
        mask=tile_in, other=0.0,
    )
    d_out = tl.load(
        DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
        mask=tile_in, other=0.0,
    )
    delta = tl.sum(out.to(tl.float32) * d_out.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_tile(
    dk, dv,
    k, v, offs_n, k_in, doc_k, span_k, valid_k,
    q_base, do_base, q_tile, do_tile, LSE, Delta, row_base, token_base, DocIds, SpanIds,
    start_m, offs_m0, d_in, T, S, q_offset, stride_qt, stride_dot, scale_log2,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_SPAN: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr, FP32_OPERANDS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One FA2 backward step of the dK/dV kernel over the query block at ``start_m``."""
    offs_m = start_m + offs_m0
    q_in = offs_m < T
    tile_qd = q_in[:, None] & d_in[None, :]
    q = tl.load(q_base + start_m * stride_qt + q_tile, mask=tile_qd, other=0.0)
    d_out = tl.load(do_base + start_m * stride_dot + do_tile, mask=tile_qd, other=0.0)
    lse = tl.load(LSE + row_base + offs_m, mask=q_in, other=float("inf"))
    delta = tl.load(Delta + row_base + offs_m, mask=q_in, other=0.0)

    scores_t = _dot(k, tl.trans(q), FP32_OPERANDS, PRECISION) * scale_log2  # [BLOCK_N, BLOCK_M]
    probs_t = tl.exp2(scores_t - lse[None, :])
    if MASKED:
        q_pos = offs_m + q_offset
        q_pos_in = q_in & (q_pos < S)
        doc_q = _load_token_vector(DocIds + token_base, q_pos, q_pos_in, HAS_DOC)
        span_q = _load_token_vector(SpanIds + token_base, q_pos, q_pos_in, HAS_SPAN)
        allowed_t = _allowed(
            q_pos[None, :], offs_n[:, None], q_in[None, :], k_in[:, None],
            doc_q[None, :], doc_k[:, None], span_q[None, :], span_k[:, None], valid_k[:, None],
            CAUSAL, HAS_DOC, HAS_SPAN, HAS_KEY_VALID,
        )
        probs_t = tl.where(allowed_t, probs_t, 0.0)
    dv += _dot(probs_t.to(d_out.dtype), d_out, FP32_OPERANDS, PRECISION)
    dprobs_t = _dot(v, tl.trans(d_out), FP32_OPERANDS, PRECISION)
    dscores_t = probs_t * (dprobs_t - delta[None, :])
    dk += _dot(dscores_t.to(q.dtype), q, FP32_OPERANDS, PRECISION)
    return dk, dv


@triton.jit
def _attention_backward_dkdv_kernel(
    Q, K, V, DOut, LSE, Delta, DK, DV,
    DocIds, SpanIds, KeyValid,
    PartialCount, FullCount, QIndex,
    scale, scale_log2,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_token_b,
    stride_count_b, stride_index_b, stride_index_n,
    n_kv_heads, group_size, T, S, q_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_SPAN: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
    DIAG_FALLBACK: tl.constexpr, FP32_OPERANDS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program = one block of ``BLOCK_N`` keys of one (batch, kv head).

    FA2 Algorithm 2 with K_j, V_j held on chip: for each query head of the GQA group and each
    live query block, recompute ``P^T = exp2(S^T - lse)`` and accumulate
    ``dV += P^T dO`` and ``dK += dS^T Q`` with ``dS = P * (dP - delta)``, ``dP = dO V^T``.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    kv_h = (pid_bh % n_kv_heads).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_m0 = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_in = offs_d < HEAD_DIM
    k_in = offs_n < S
    tile_kd = k_in[:, None] & d_in[None, :]
    k = tl.load(
        K + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
        mask=tile_kd, other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
        mask=tile_kd, other=0.0,
    )
    token_base = b * stride_token_b
    doc_k = _load_token_vector(DocIds + token_base, offs_n, k_in, HAS_DOC)
    span_k = _load_token_vector(SpanIds + token_base, offs_n, k_in, HAS_SPAN)
    valid_k = _load_token_vector(KeyValid + token_base, offs_n, k_in, HAS_KEY_VALID)
    q_tile = offs_m0[:, None] * stride_qt + offs_d[None, :] * stride_qd
    do_tile = offs_m0[:, None] * stride_dot + offs_d[None, :] * stride_dod

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    n_partial = tl.load(PartialCount + b * stride_count_b + pid_n)
    n_full = tl.load(FullCount + b * stride_count_b + pid_n)
    index_base = QIndex + b * stride_index_b + pid_n * stride_index_n
    for g in range(0, group_size):
        h = kv_h * group_size + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOut + b * stride_dob + h * stride_doh
        row_base = (b * n_kv_heads * group_size + h) * T
        for i in range(0, n_partial):
            start_m = tl.load(index_base + i).to(tl.int64) * BLOCK_M
            dk, dv = _dkdv_tile(
                dk, dv, k, v, offs_n, k_in, doc_k, span_k, valid_k,
                q_base, do_base, q_tile, do_tile, LSE, Delta, row_base, token_base, DocIds, SpanIds,
                start_m, offs_m0, d_in, T, S, q_offset, stride_qt, stride_dot, scale_log2,
                True, CAUSAL, HAS_DOC, HAS_SPAN, HAS_KEY_VALID, FP32_OPERANDS, PRECISION,
            )
        for i in range(n_partial, n_partial + n_full):
            start_m = tl.load(index_base + i).to(tl.int64) * BLOCK_M
            dk, dv = _dkdv_tile(
                dk, dv, k, v, offs_n, k_in, doc_k, span_k, valid_k,
                q_base, do_base, q_tile, do_tile, LSE, Delta, row_base, token_base, DocIds, SpanIds,
                start_m, offs_m0, d_in, T, S, q_offset, stride_qt, stride_dot, scale_log2,
                False, CAUSAL, HAS_DOC, HAS_SPAN, HAS_KEY_VALID, FP32_OPERANDS, PRECISION,
            )
        if DIAG_FALLBACK:
            # Query rows that saw no key took v[q_pos] as output (probability 1 on the diagonal):
            # dV[j] gets dO of the query at position j; dS = 1 * (dO.v - dO.o) = 0, so dQ, dK don't.
            t_diag = offs_n - q_offset
            t_in = k_in & (t_diag >= 0) & (t_diag < T)
            lse_diag = tl.load(LSE + row_base + t_diag, mask=t_in, other=0.0)
            fallback = t_in & (lse_diag == float("inf"))
            d_out_diag = tl.load(
                do_base + t_diag[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                mask=fallback[:, None] & d_in[None, :], other=0.0,
            )
            dv += d_out_diag.to(tl.float32)

    dk = dk * scale
    tl.store(
        DK + b * stride_dkb + kv_h * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
        dk.to(DK.dtype.element_ty), mask=tile_kd,
    )
    tl.store(
        DV + b * stride_dvb + kv_h * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty), mask=tile_kd,
    )


@triton.jit
def _dq_tile(
    dq,
    q, d_out, lse, delta, q_pos, q_in, doc_q, span_q,
    k_tile, v_tile, token_base, DocIds, SpanIds, KeyValid,
    start_n, offs_n0, d_in, S, stride_ks, stride_vs, scale_log2,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_SPAN: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr, FP32_OPERANDS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One FA2 backward step of the dQ kernel over the key block at ``start_n``."""
    offs_n = start_n + offs_n0
    k_in = offs_n < S
    tile_kd = k_in[:, None] & d_in[None, :]
    k = tl.load(k_tile + start_n * stride_ks, mask=tile_kd, other=0.0)
    v = tl.load(v_tile + start_n * stride_vs, mask=tile_kd, other=0.0)
    scores = _dot(q, tl.trans(k), FP32_OPERANDS, PRECISION) * scale_log2
    probs = tl.exp2(scores - lse[:, None])
    if MASKED:
        doc_k = _load_token_vector(DocIds + token_base, offs_n, k_in, HAS_DOC)
        span_k = _load_token_vector(SpanIds + token_base, offs_n, k_in, HAS_SPAN)
        valid_k = _load_token_vector(KeyValid + token_base, offs_n, k_in, HAS_KEY_VALID)
        allowed = _allowed(
            q_pos[:, None], offs_n[None, :], q_in[:, None], k_in[None, :],
            doc_q[:, None], doc_k[None, :], span_q[:, None], span_k[None, :], valid_k[None, :],
            CAUSAL, HAS_DOC, HAS_SPAN, HAS_KEY_VALID,
        )
        probs = tl.where(allowed, probs, 0.0)
    dprobs = _dot(d_out, tl.trans(v), FP32_OPERANDS, PRECISION)
    dscores = probs * (dprobs - delta[:, None])
    dq += _dot(dscores.to(k.dtype), k, FP32_OPERANDS, PRECISION)
    return dq


@triton.jit
def _attention_backward_dq_kernel(
    Q, K, V, DOut, LSE, Delta, DQ,
    DocIds, SpanIds, KeyValid,
    PartialCount, FullCount, KvIndex,
    scale, scale_log2,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_token_b,
    stride_count_b, stride_index_b, stride_index_m,
    n_q_heads, group_size, T, S, q_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HAS_SPAN: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
    FP32_OPERANDS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program = one block of ``BLOCK_M`` queries of one (batch, query head).

    FA2 Algorithm 2, dQ half (kept separate from dK/dV so no atomics are needed):
    ``dQ = scale * sum_j dS_j K_j`` over the live key blocks.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = (pid_bh % n_q_heads).to(tl.int64)
    kv_h = h // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n0 = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_in = offs_d < HEAD_DIM
    q_in = offs_m < T
    q_pos = offs_m + q_offset
    q_pos_in = q_in & (q_pos < S)
    tile_qd = q_in[:, None] & d_in[None, :]
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=tile_qd, other=0.0,
    )
    d_out = tl.load(
        DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
        mask=tile_qd, other=0.0,
    )
    row_base = pid_bh.to(tl.int64) * T
    lse = tl.load(LSE + row_base + offs_m, mask=q_in, other=float("inf"))
    delta = tl.load(Delta + row_base + offs_m, mask=q_in, other=0.0)
    token_base = b * stride_token_b
    doc_q = _load_token_vector(DocIds + token_base, q_pos, q_pos_in, HAS_DOC)
    span_q = _load_token_vector(SpanIds + token_base, q_pos, q_pos_in, HAS_SPAN)

    k_tile = K + b * stride_kb + kv_h * stride_kh + offs_n0[:, None] * stride_ks + offs_d[None, :] * stride_kd
    v_tile = V + b * stride_vb + kv_h * stride_vh + offs_n0[:, None] * stride_vs + offs_d[None, :] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_partial = tl.load(PartialCount + b * stride_count_b + pid_m)
    n_full = tl.load(FullCount + b * stride_count_b + pid_m)
    index_base = KvIndex + b * stride_index_b + pid_m * stride_index_m
    for i in range(0, n_partial):
        start_n = tl.load(index_base + i).to(tl.int64) * BLOCK_N
        dq = _dq_tile(
            dq, q, d_out, lse, delta, q_pos, q_in, doc_q, span_q,
            k_tile, v_tile, token_base, DocIds, SpanIds, KeyValid,
            start_n, offs_n0, d_in, S, stride_ks, stride_vs, scale_log2,
            True, CAUSAL, HAS_DOC, HAS_SPAN, HAS_KEY_VALID, FP32_OPERANDS, PRECISION,
        )
    for i in range(n_partial, n_partial + n_full):
        start_n = tl.load(index_base + i).to(tl.int64) * BLOCK_N
        dq = _dq_tile(
            dq, q, d_out, lse, delta, q_pos, q_in, doc_q, span_q,
            k_tile, v_tile, token_base, DocIds, SpanIds, KeyValid,
            start_n, offs_n0, d_in, S, stride_ks, stride_vs, scale_log2,
            False, CAUSAL, HAS_DOC, HAS_SPAN, HAS_KEY_VALID, FP32_OPERANDS, PRECISION,
        )

    dq = dq * scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
        dq.to(DQ.dtype.element_ty), mask=tile_qd,
    )


#: True when TRITON_INTERPRET=1 was set as this module was imported: kernels take CPU tensors.
INTERPRETED = bool(InterpretedFunction) and isinstance(_attention_forward_kernel, InterpretedFunction)
#: The interpreter also needs triton.language's own jit functions (tl.sum, tl.max) interpreted,
#: which Triton decides when *it* is first imported (timm, open_clip, torch._dynamo import it).
INTERPRETER_READY = INTERPRETED and isinstance(tl.sum, InterpretedFunction)

_HELPERS_HAVE_PYTHON_BODIES = all(
    hasattr(helper, "rewrite") for helper in (_dot, _load_token_vector, _allowed, _forward_tile, _dkdv_tile, _dq_tile)
)
if INTERPRETED and _HELPERS_HAVE_PYTHON_BODIES:
    # Triton's interpreter re-patches triton.language on every call of a @triton.jit helper
    # (~5 ms each, and the patches pile up so calls get slower over a session). The kernel that
    # calls a helper has already patched this module's `tl`, so the kernels may call the
    # helpers' rewritten Python bodies directly: same semantics, ~10x faster tests.
    _dot = _dot.rewrite()
    _load_token_vector = _load_token_vector.rewrite()
    _allowed = _allowed.rewrite()
    _forward_tile = _forward_tile.rewrite()
    _dkdv_tile = _dkdv_tile.rewrite()
    _dq_tile = _dq_tile.rewrite()


# =========================================================================================
# Launch configuration
# =========================================================================================
@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel family (forward or backward).

    ``block_m`` queries x ``block_n`` keys per tile; the block schedule is built for these sizes.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


#: The interpreter runs one numpy op per Triton op: small tiles keep masked waste low.
_INTERPRETER_CONFIG = KernelConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)

#: CUDA tiles per head-dim bucket (padded head dim <= key): (forward, backward). The fastest of a
#: small sweep on one H200 (torch 2.11, Triton 3.6, bf16, B4 H16 S4096, prefix-LM and packed
#: documents): Dh 64 forward among 128x64 / 64x64 / 128x128 tiles with 4 or 8 warps, backward among
#: 64x64 / 32x64 / 64x128 / 128x64; Dh 128 on prefix-LM only (8 warps halved the backward speed).
_CUDA_CONFIGS: dict[int, tuple[KernelConfig, KernelConfig]] = {
    64: (KernelConfig(128, 64, num_warps=4, num_stages=3), KernelConfig(64, 64, num_warps=4, num_stages=2)),
    128: (KernelConfig(64, 64, num_warps=4, num_stages=3), KernelConfig(64, 64, num_warps=4, num_stages=2)),
}


def kernel_configs(head_dim: int, device_type: str) -> tuple[KernelConfig, KernelConfig]:
    """(forward, backward) :class:`KernelConfig` for a head dim on a device type."""
    if device_type != "cuda" or INTERPRETED:
        return _INTERPRETER_CONFIG, _INTERPRETER_CONFIG
    padded = _padded_head_dim(head_dim)
    bucket = min(size for size in _CUDA_CONFIGS if size >= padded)
    return _CUDA_CONFIGS[bucket]


def _padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# =========================================================================================
# Block schedule (torch pre-pass)
# =========================================================================================
def _token_vectors_for_queries(values: Tensor, q_offset: int, T: int) -> Tensor:
    """``values[:, q_offset : q_offset + T]``: the per-token vector at each query's position."""
    return values[:, q_offset : q_offset + T]


def _blocked_range(values: Tensor, include: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per-block (min, max) of ``values [B, L]`` over positions where ``include`` holds.

    Blocks without an included position get the empty interval (int64 max, int64 min), which
    overlaps nothing.
    """
    batch, length = values.shape
    pad = -length % block
    values = torch.nn.functional.pad(values, (0, pad))
    include = torch.nn.functional.pad(include, (0, pad), value=False)
    info = torch.iinfo(torch.int64)
    lo = torch.where(include, values, info.max).view(batch, -1, block).amin(-1)
    hi = torch.where(include, values, info.min).view(batch, -1, block).amax(-1)
    return lo, hi


def _intervals_overlap(q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor) -> Tensor:
    """``[B, nQB, nKB]``: query block interval meets key block interval."""
    return (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])


def block_tiles(mask: AttentionMask, T: int, S: int, block_m: int, block_n: int) -> tuple[Tensor, Tensor]:
    """Classify (query block, key block) tiles: ``(live, full)``, each ``[B or 1, ceil(T/BM), ceil(S/BN)]``.

    ``live``: the tile may hold an allowed pair. Conservative (never drops a tile with an allowed
    pair) and exact at block granularity for contiguous documents and spans. All of these hold:

    * some key of the key block is valid (``key_valid``);
    * the document-id ranges (min..max) of the two blocks overlap;
    * causal masks: the key block starts at or before the block's last query position, or the
      nonzero image-span-id ranges of the two blocks overlap (a span sees its later tokens).

    ``full``: every pair of the tile is allowed, so the kernels skip evaluating the mask there
    (FlexAttention's "full blocks"): both blocks lie inside T / S, every key is valid, both blocks
    hold one and the same document, and (causal) the key block ends at or before the first query
    position or both blocks lie inside one image span.

    The diagonal fallback of empty causal rows is handled by the kernels outside these tiles.
    Cost: O(B * (T + S) + B * T/BM * S/BN) integer ops, no ``[T, S]`` tensor.
    """
    device = next(
        (t.device for t in (mask.key_valid, mask.document_ids, mask.span_ids) if t is not None),
        torch.device("cpu"),
    )
    n_q_blocks, n_k_blocks = triton.cdiv(T, block_m), triton.cdiv(S, block_n)
    q_blocks = torch.arange(n_q_blocks, device=device)
    k_blocks = torch.arange(n_k_blocks, device=device)
    live = torch.ones(1, n_q_blocks, n_k_blocks, dtype=torch.bool, device=device)
    full = (((q_blocks + 1) * block_m <= T)[:, None] & ((k_blocks + 1) * block_n <= S)[None, :])[None]
    if mask.causal:
        first_q_pos = q_blocks * block_m + mask.q_offset
        last_q_pos = torch.clamp((q_blocks + 1) * block_m, max=T) - 1 + mask.q_offset
        reach = (k_blocks[None, :] * block_n <= last_q_pos[:, None])[None]
        below_diagonal = ((k_blocks[None, :] + 1) * block_n - 1 <= first_q_pos[:, None])[None]
        if mask.span_ids is not None:
            span = mask.span_ids.long()
            span_q = _token_vectors_for_queries(span, mask.q_offset, T)
            reach = reach | _intervals_overlap(
                *_blocked_range(span_q, span_q != 0, block_m), *_blocked_range(span, span != 0, block_n)
            )
            below_diagonal = below_diagonal | _same_single_value(
                *_blocked_range(span_q, torch.ones_like(span_q, dtype=torch.bool), block_m),
                *_blocked_range(span, torch.ones_like(span, dtype=torch.bool), block_n),
                nonzero=True,
            )
        live = live & reach
        full = full & below_diagonal
    if mask.document_ids is not None:
        doc = mask.document_ids.long()
        doc_q = _token_vectors_for_queries(doc, mask.q_offset, T)
        q_range = _blocked_range(doc_q, torch.ones_like(doc_q, dtype=torch.bool), block_m)
        k_range = _blocked_range(doc, torch.ones_like(doc, dtype=torch.bool), block_n)
        live = live & _intervals_overlap(*q_range, *k_range)
        full = full & _same_single_value(*q_range, *k_range, nonzero=False)
    if mask.key_valid is not None:
        valid = torch.nn.functional.pad(mask.key_valid.bool(), (0, -S % block_n), value=False)
        valid = valid.view(valid.shape[0], n_k_blocks, block_n)
        live = live & valid.any(-1)[:, None, :]
        full = full & valid.all(-1)[:, None, :]
    return live, full & live


def block_visit_mask(mask: AttentionMask, T: int, S: int, block_m: int, block_n: int) -> Tensor:
    """``[B or 1, ceil(T/BM), ceil(S/BN)]`` bool: the tiles the kernels visit (see :func:`block_tiles`)."""
    return block_tiles(mask, T, S, block_m, block_n)[0]


def _same_single_value(q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor, nonzero: bool) -> Tensor:
    """``[B, nQB, nKB]``: both blocks hold one value, the same one (and it is nonzero if asked)."""
    same = (q_lo == q_hi)[:, :, None] & (k_lo == k_hi)[:, None, :] & (q_lo[:, :, None] == k_lo[:, None, :])
    return same & (q_lo[:, :, None] != 0) if nonzero else same


@dataclass(frozen=True)
class BlockSchedule:
    """Compact lists of live tiles, the layout of FlexAttention's ``BlockMask``.

    Attributes:
        kv_partial: ``[Bs, nQB]`` int32, live key blocks per query block that need the mask.
        kv_full: ``[Bs, nQB]`` int32, live key blocks per query block where every pair is allowed.
        kv_index: ``[Bs, nQB, nKB]`` int32, the partial key blocks then the full ones, each group
            ascending (forward and dQ kernels).
        q_partial, q_full, q_index: the transpose, live query blocks per key block (dK/dV kernel).
        ``Bs`` is 1 when the mask has no per-row tensors (shared by the whole batch).
    """

    kv_partial: Tensor
    kv_full: Tensor
    kv_index: Tensor
    q_partial: Tensor
    q_full: Tensor
    q_index: Tensor

    @classmethod
    def from_tiles(cls, live: Tensor, full: Tensor) -> "BlockSchedule":
        def compact(live: Tensor, full: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            # A stable sort by (partial, full, dead) rank lists live indices first, ascending.
            rank = torch.where(full, 1, torch.where(live, 0, 2)).to(torch.int8)
            order = torch.sort(rank, dim=-1, stable=True).indices.to(torch.int32).contiguous()
            return (live & ~full).sum(-1, dtype=torch.int32), full.sum(-1, dtype=torch.int32), order

        kv = compact(live, full)
        q = compact(live.transpose(1, 2), full.transpose(1, 2))
        return cls(*kv, *q)


@dataclass(frozen=True)
class _PreparedMask:
    """Kernel-ready mask vectors ``[B, S]`` (None when unused) and the block schedule."""

    document_ids: Tensor | None
    span_ids: Tensor | None
    key_valid: Tensor | None
    schedule: BlockSchedule


_PREPARED = PerMaskCache(max_entries=32)


def _prepare_mask(
    mask: AttentionMask, batch: int, T: int, S: int, device: torch.device, config: KernelConfig
) -> _PreparedMask:
    def build() -> _PreparedMask:
        def per_token(values: Tensor | None, dtype: torch.dtype) -> Tensor | None:
            if values is None:
                return None
            return values.to(device=device, dtype=dtype).expand(batch, S).contiguous()

        live, full = block_tiles(mask, T, S, config.block_m, config.block_n)
        return _PreparedMask(
            document_ids=per_token(mask.document_ids, torch.int64),
            span_ids=per_token(mask.span_ids, torch.int64),
            key_valid=per_token(mask.key_valid, torch.int8),
            schedule=BlockSchedule.from_tiles(live.to(device), full.to(device)),
        )

    return _PREPARED.get(mask, (batch, T, S, str(device), config.block_m, config.block_n), build)


# =========================================================================================
# Autograd wrapper
# =========================================================================================
def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _batch_stride(t: Tensor) -> int:
    """Batch stride of a schedule tensor; 0 when one schedule (batch 1) serves every row."""
    return t.stride(0) if t.shape[0] > 1 else 0


def _mask_flags(mask: AttentionMask) -> dict[str, bool]:
    return dict(
        CAUSAL=mask.causal,
        HAS_DOC=mask.document_ids is not None,
        HAS_SPAN=mask.causal and mask.span_ids is not None,  # spans only widen a causal mask
        HAS_KEY_VALID=mask.key_valid is not None,
    )


def _diag_fallback(mask: AttentionMask, T: int, S: int) -> bool:
    """Whether empty causal rows exist and take their diagonal key (:meth:`AttentionMask.dense`).

    Only a padding mask can empty a causal row (its own position is otherwise always allowed).
    """
    return mask.causal and T <= S and mask.key_valid is not None


def _dot_options(dtype: torch.dtype) -> dict[str, object]:
    return dict(FP32_OPERANDS=INTERPRETED, PRECISION="ieee" if dtype == torch.float32 or INTERPRETED else "tf32")


def _token_pointers(prepared: _PreparedMask, fallback: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pointers for the three per-token vectors; absent ones get a never-read placeholder."""
    return tuple(t if t is not None else fallback for t in (prepared.document_ids, prepared.span_ids, prepared.key_valid))


class _FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float) -> Tensor:
        B, Hq, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        forward_config, _ = kernel_configs(D, q.device.type)
        prepared = _prepare_mask(mask, B, T, S, q.device, forward_config)
        schedule = prepared.schedule
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(T, forward_config.block_m), B * Hq)
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            _attention_forward_kernel[grid](
                q, k, v, out, lse,
                *_token_pointers(prepared, schedule.kv_index),
                schedule.kv_partial, schedule.kv_full, schedule.kv_index,
                scale * _LOG2_E,
                *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                S,  # batch stride of the [B, S] per-token vectors
                _batch_stride(schedule.kv_partial), _batch_stride(schedule.kv_index), schedule.kv_index.stride(1),
                Hq, Hq // Hkv, T, S, mask.q_offset,
                HEAD_DIM=D, BLOCK_D=_padded_head_dim(D),
                BLOCK_M=forward_config.block_m, BLOCK_N=forward_config.block_n,
                **_mask_flags(mask), DIAG_FALLBACK=_diag_fallback(mask, T, S), **_dot_options(q.dtype),
                num_warps=forward_config.num_warps, num_stages=forward_config.num_stages,
            )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask = mask
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        q, k, v, out, lse = ctx.saved_tensors
        mask: AttentionMask = ctx.mask
        B, Hq, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        _, config = kernel_configs(D, q.device.type)
        prepared = _prepare_mask(mask, B, T, S, q.device, config)
        schedule = prepared.schedule
        padded_d = _padded_head_dim(D)
        shared = dict(HEAD_DIM=D, BLOCK_D=padded_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n)
        launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        flags = _mask_flags(mask)
        dot_options = _dot_options(q.dtype)

        delta = torch.empty_like(lse)
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        token_pointers = _token_pointers(prepared, schedule.kv_index)
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            _attention_backward_delta_kernel[(triton.cdiv(T, config.block_m), B * Hq)](
                out, d_out, delta, *_strides(out), *_strides(d_out), Hq, T,
                HEAD_DIM=D, BLOCK_D=padded_d, BLOCK_M=config.block_m,
            )
            _attention_backward_dkdv_kernel[(triton.cdiv(S, config.block_n), B * Hkv)](
                q, k, v, d_out, lse, delta, dk, dv,
                *token_pointers,
                schedule.q_partial, schedule.q_full, schedule.q_index,
                ctx.scale, ctx.scale * _LOG2_E,
                *_strides(q), *_strides(k), *_strides(v), *_strides(d_out), *_strides(dk), *_strides(dv),
                S,  # batch stride of the [B, S] per-token vectors
                _batch_stride(schedule.q_partial), _batch_stride(schedule.q_index), schedule.q_index.stride(1),
                Hkv, Hq // Hkv, T, S, mask.q_offset,
                **shared, **flags, DIAG_FALLBACK=_diag_fallback(mask, T, S), **dot_options, **launch,
            )
            _attention_backward_dq_kernel[(triton.cdiv(T, config.block_m), B * Hq)](
                q, k, v, d_out, lse, delta, dq,
                *token_pointers,
                schedule.kv_partial, schedule.kv_full, schedule.kv_index,
                ctx.scale, ctx.scale * _LOG2_E,
                *_strides(q), *_strides(k), *_strides(v), *_strides(d_out), *_strides(dq),
                S,  # batch stride of the [B, S] per-token vectors
                _batch_stride(schedule.kv_partial), _batch_stride(schedule.kv_index), schedule.kv_index.stride(1),
                Hq, Hq // Hkv, T, S, mask.q_offset,
                **shared, **flags, **dot_options, **launch,
            )
        return dq, dk, dv, None, None


# =========================================================================================
# Public entry point
# =========================================================================================
def _validate(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> None:
    if mask.is_cross:
        raise ValueError(
            "triton attention implements the self-attention mask family only; got a cross-attention "
            "mask (images_seen/key_image_ids): use backend 'sdpa' or 'math'"
        )
    if mask.branch_ids is not None:
        raise ValueError(
            "triton attention does not implement shared-prefix branches (mask.branch_ids); "
            "use backend 'flex' (the CUDA default for such masks), 'sdpa' or 'math'"
        )
    check_attention_inputs(q, k, v, mask)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton attention supports {SUPPORTED_DTYPES}; got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    head_dim = q.shape[3]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head dims {MIN_HEAD_DIM}..{MAX_HEAD_DIM}; got {head_dim}")
    if q.device.type == "cpu" and not INTERPRETER_READY:
        raise RuntimeError(
            "triton attention runs on CPU tensors only in Triton's interpreter, which needs "
            "TRITON_INTERPRET=1 in the environment before triton is first imported (timm, open_clip "
            "and torch._dynamo import it); on CPU prefer backend 'sdpa'"
        )
    B, T, S = q.shape[0], q.shape[2], k.shape[2]
    if B == 0 or T == 0 or S == 0:
        raise ValueError(f"triton attention needs B, T, S >= 1; got B={B}, T={T}, S={S}")


def triton_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float | None = None) -> Tensor:
    """FlashAttention-2 (Triton) under a self-attention :class:`AttentionMask`; differentiable.

    Same contract as :func:`minivlm.kernels.reference.math_attention`.

    Args:
        q: ``[B, Hq, T, Dh]``; k, v: ``[B, Hkv, S, Dh]`` with ``Hq % Hkv == 0``, one dtype among
            fp32/bf16/fp16, ``16 <= Dh <= 128``.
        mask: any non-cross mask; its tensors are ``[B or 1, S]``.
        scale: softmax scale, default ``1 / sqrt(Dh)``.
    Returns:
        ``[B, Hq, T, Dh]`` in q's dtype.

    Under autocast the inputs are cast to the autocast dtype of their device, as autocast does for
    SDPA; the kernels then run in that dtype with fp32 accumulation.

    Raises:
        ValueError: cross-attention mask, bad shapes, mixed or unsupported dtypes, unsupported
            head dim, mask tensors of the wrong shape.
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    _validate(q, k, v, mask)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _FlashAttentionFunction.apply(q, k, v, mask, scale)


logger.debug("attention backend 'triton' loaded (interpreted=%s)", INTERPRETED)
