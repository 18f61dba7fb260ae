"""One attention entry point for every part of the model.

Modules never build mask matrices. They describe *which* keys a query may see with an
:class:`AttentionMask` and call :func:`attention`, which picks a kernel:

* ``sdpa`` with no mask tensor when the description is plain causal or plain bidirectional,
  so PyTorch can take its flash path (an explicit mask silently drops SDPA to the
  memory-efficient or math kernel);
* ``sdpa`` with a boolean mask built from the description otherwise;
* ``math``: the fp32-softmax reference, always available;
* further backends (``flex``, ``triton``) register themselves in :data:`BACKENDS`.

The VLM mask family (self-attention), for query ``i`` and key ``j`` of one row::

    allowed(i, j) = key_valid[j]
                    and doc[i] == doc[j]                     # packed documents
                    and (branch[j] == 0 or branch[j] == branch[i])  # shared-prefix branches
                    and (j <= i  or  span[i] == span[j] != 0)  # causal, but images see themselves
                                                               # bidirectionally (prefix-LM)

Branches are prefix sharing: several continuations of one prefix (e.g. ten questions about the
same image) sit in one document as ``prefix, branch 1, branch 2, ...``; each branch sees the
prefix (branch id 0) and itself, never its siblings, so with positions restarting after the
prefix every branch is computed exactly as if it followed the prefix alone
(:func:`minivlm.data.collate.merge_shared_prefix`).

with ``i`` measured in absolute positions (``q_offset + i``) so the same rule serves
incremental decoding against a KV cache. Cross-attention (Flamingo) uses a different rule:
a text query may see the tokens of image ``m`` when ``m < images_seen[i]``.

Shapes: ``q [B, Hq, T, Dh]``, ``k, v [B, Hkv, S, Dh]`` with ``Hq % Hkv == 0`` (grouped-query).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AttentionMask:
    """Describes which keys each query may attend to; see the module docstring.

    Attributes:
        causal: queries see only keys at the same or earlier absolute position (self-attention).
        q_offset: absolute position of query 0 (> 0 when decoding against a KV cache).
        key_valid: ``[B, S]`` bool, False for padding keys.
        document_ids: ``[B, S]`` int, id of the packed document each key position belongs to;
            query ``i`` uses ``document_ids[:, q_offset + i]``.
        span_ids: ``[B, S]`` int, 0 for ordinary tokens, a positive id shared by the tokens of
            one image: tokens of the same span see each other bidirectionally (prefix-LM).
        branch_ids: ``[B, S]`` int, 0 for a shared prefix, ``k > 0`` for the tokens of its
            ``k``-th continuation: a branch sees the prefix and itself, not its siblings.
        images_seen: ``[B, T]`` int, cross-attention only: how many images precede query ``i``.
        key_image_ids: ``[B, S]`` int, cross-attention only: image index of each key, -1 for
            padding keys.
    """

    causal: bool = True
    q_offset: int = 0
    key_valid: Tensor | None = None
    document_ids: Tensor | None = None
    span_ids: Tensor | None = None
    branch_ids: Tensor | None = None
    images_seen: Tensor | None = None
    key_image_ids: Tensor | None = None

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def causal_lm(cls, **kw) -> "AttentionMask":
        return cls(causal=True, **kw)

    @classmethod
    def bidirectional(cls, key_valid: Tensor | None = None) -> "AttentionMask":
        return cls(causal=False, key_valid=key_valid)

    @classmethod
    def cross(cls, images_seen: Tensor, key_image_ids: Tensor) -> "AttentionMask":
        return cls(causal=False, images_seen=images_seen, key_image_ids=key_image_ids)

    def with_offset(self, q_offset: int) -> "AttentionMask":
        return replace(self, q_offset=q_offset)

    # ---- classification ------------------------------------------------------------------
    @property
    def is_cross(self) -> bool:
        return self.images_seen is not None

    @property
    def kind(self) -> str:
        """A short name used for backend dispatch and benchmarks."""
        if self.is_cross:
            return "cross"
        if self.branch_ids is not None:
            return "branches"
        if self.document_ids is not None:
            return "documents"
        if self.span_ids is not None:
            return "prefix_lm"
        if self.key_valid is not None:
            return "padded_causal" if self.causal else "padded_bidirectional"
        return "causal" if self.causal else "bidirectional"

    def flag_only(self, T: int, S: int) -> bool | None:
        """The ``is_causal`` flag that makes SDPA compute this mask with no mask tensor, or None.

        SDPA's ``is_causal`` aligns the diagonal to the top-left corner, so a causal mask is flag-only
        when queries and keys cover the same positions, or when one query is the newest position
        (a decode step sees every key: no flag at all).
        """
        kind = self.kind
        if kind == "bidirectional":
            return False
        if kind == "causal":
            if self.q_offset == 0 and T == S:
                return True
            if T == 1 and self.q_offset == S - 1:
                return False
        return None

    # ---- materialisation (reference path and SDPA fallback) ------------------------------
    def dense(self, T: int, S: int, device: torch.device | None = None) -> Tensor:
        """Boolean ``[B or 1, 1, T, S]`` matrix, True where attention is allowed.

        Rows that would allow nothing (padding queries) are given their own diagonal key so that
        softmax stays finite; their outputs are meaningless and never supervised.
        """
        if self.is_cross:
            seen = self.images_seen.to(device)[:, :, None]  # [B, T, 1]
            kid = self.key_image_ids.to(device)[:, None, :]  # [B, 1, S]
            return ((kid >= 0) & (kid < seen))[:, None]
        ref = next((t for t in (self.key_valid, self.document_ids, self.span_ids, self.branch_ids) if t is not None),
                   None)
        if device is None and ref is not None:
            device = ref.device
        qpos = torch.arange(self.q_offset, self.q_offset + T, device=device)
        kpos = torch.arange(S, device=device)
        allowed = torch.ones(1, T, S, dtype=torch.bool, device=device)
        if self.causal:
            causal = kpos[None, :] <= qpos[:, None]
            if self.span_ids is not None:
                sq = self.span_ids[:, self.q_offset : self.q_offset + T]
                same_span = (sq[:, :, None] == self.span_ids[:, None, :]) & (sq[:, :, None] != 0)
                causal = causal[None] | same_span
            allowed = allowed & causal
        if self.document_ids is not None:
            dq = self.document_ids[:, self.q_offset : self.q_offset + T]
            allowed = allowed & (dq[:, :, None] == self.document_ids[:, None, :])
        if self.branch_ids is not None:
            bq = self.branch_ids[:, self.q_offset : self.q_offset + T]
            bk = self.branch_ids[:, None, :]
            allowed = allowed & ((bk == 0) | (bk == bq[:, :, None]))
        if self.key_valid is not None:
            allowed = allowed & self.key_valid[:, None, :].bool()
        if self.causal and T <= S:
            # Keep every row non-empty (padding queries): allow the query's own position.
            diag = kpos[None, :] == qpos[:, None]
            allowed = allowed | (diag[None] & ~allowed.any(-1, keepdim=True))
        return allowed[:, None]

    def query_has_keys(self, T: int, S: int, device=None) -> Tensor:
        """``[B, 1, T, 1]`` bool: False for cross-attention queries that precede every image."""
        return self.dense(T, S, device).any(-1, keepdim=True)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects 4-d q/k/v [B, H, T, Dh]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k disagree on batch or head dim: {tuple(q.shape)} vs {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


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


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float | None = None) -> Tensor:
    """PyTorch SDPA; flag-only (flash-eligible) when the mask is plain, else a boolean mask."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    flag = mask.flag_only(T, S)
    if flag is not None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=flag, scale=scale, enable_gqa=gqa)
    allowed = mask.dense(T, S, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    if mask.is_cross:
        out = out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return out


AttentionFn = Callable[..., Tensor]

#: Registered attention kernels. ``flex`` and ``triton`` add themselves from ``minivlm.kernels``.
BACKENDS: dict[str, AttentionFn] = {"math": math_attention, "sdpa": sdpa_attention}


def register_backend(name: str, fn: AttentionFn) -> None:
    BACKENDS[name] = fn


def pick_backend(mask: AttentionMask, device: torch.device) -> str:
    """Default kernel choice per (device, mask kind); see :mod:`minivlm.kernels.dispatch`.

    Decode steps (``q_offset > 0``) stay on SDPA: FlexAttention compiles per shape and offset.
    """
    if mask.q_offset:
        return "sdpa"
    from minivlm.kernels.dispatch import default_backend  # lazy: minivlm.kernels imports this module

    return default_backend(mask.kind, device.type)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    *,
    backend: str | None = None,
    scale: float | None = None,
) -> Tensor:
    """Scaled dot-product attention under a mask description.

    Args:
        q: ``[B, Hq, T, Dh]``; k, v: ``[B, Hkv, S, Dh]``.
        mask: what each query may see.
        backend: a key of :data:`BACKENDS`, or None/"auto" to choose per device and mask kind.
    Returns:
        ``[B, Hq, T, Dh]``.
    """
    _check_shapes(q, k, v)
    if backend in (None, "auto"):
        backend = pick_backend(mask, q.device)
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {sorted(BACKENDS)}") from None
    return fn(q, k, v, mask, scale=scale)
