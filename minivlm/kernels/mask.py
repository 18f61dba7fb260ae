"""What a query may see: the :class:`AttentionMask` description every attention call receives,
and the one input check every backend shares.

Modules never build mask matrices. They describe *which* keys a query may see and call
:func:`minivlm.kernels.dispatch.attention`, which picks a kernel; each kernel reads the
description its own way (SDPA a boolean matrix from :meth:`AttentionMask.dense`, FlexAttention a
``mask_mod``, the Triton kernel per-token vectors).

The VLM mask family (self-attention), for query ``i`` and key ``j`` of one row::

    allowed(i, j) = key_valid[j]
                    and doc[i] == doc[j]                     # packed documents
                    and (branch[j] == 0 or branch[j] == branch[i])  # shared-prefix branches
                    and (j <= i  or  span[i] == span[j] != 0)  # causal, but images see themselves
                                                               # bidirectionally (prefix-LM)

with ``i`` and ``j`` measured in absolute positions (``q_offset + i``) so the same rule serves
incremental decoding against a KV cache. Cross-attention (Flamingo) uses a different rule:
a text query may see the tokens of image ``m`` when ``images_before[i] <= m < images_seen[i]``
(``images_before`` counts the images of earlier packed documents of the row; 0 without packing).

Branches are prefix sharing: several continuations of one prefix (e.g. ten questions about the
same image) sit in one document as ``prefix, branch 1, branch 2, ...``; each branch sees the
prefix (branch id 0) and itself, never its siblings, so with positions restarting after the
prefix every branch is computed exactly as if it followed the prefix alone
(:func:`minivlm.data.collate.merge_shared_prefix`).

Shapes: ``q [B, Hq, T, Dh]``, ``k, v [B, Hkv, S, Dh]`` with ``Hq % Hkv == 0`` (grouped-query).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["AttentionMask", "MASK_KINDS", "check_attention_inputs"]

#: Every value :attr:`AttentionMask.kind` can take.
MASK_KINDS = frozenset(
    {"causal", "bidirectional", "prefix_lm", "documents", "branches", "padded_causal", "padded_bidirectional", "cross"}
)


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
        images_before: ``[B, T]`` int or None, cross-attention of packed rows only: images of the
            row before query ``i``'s document, which it may not see.
    """

    causal: bool = True
    q_offset: int = 0
    key_valid: Tensor | None = None
    document_ids: Tensor | None = None
    span_ids: Tensor | None = None
    branch_ids: Tensor | None = None
    images_seen: Tensor | None = None
    key_image_ids: Tensor | None = None
    images_before: Tensor | None = None

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def causal_lm(cls, **kw) -> "AttentionMask":
        return cls(causal=True, **kw)

    @classmethod
    def bidirectional(cls, key_valid: Tensor | None = None) -> "AttentionMask":
        return cls(causal=False, key_valid=key_valid)

    @classmethod
    def cross(cls, images_seen: Tensor, key_image_ids: Tensor, images_before: Tensor | None = None) -> "AttentionMask":
        return cls(causal=False, images_seen=images_seen, key_image_ids=key_image_ids, images_before=images_before)

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
            lower = 0 if self.images_before is None else self.images_before.to(device)[:, :, None]
            return ((kid >= lower) & (kid >= 0) & (kid < seen))[:, None]
        if (self.causal and T == 1 and self.q_offset == S - 1 and self.key_valid is not None
                and self.document_ids is None and self.span_ids is None and self.branch_ids is None):
            return self._decode_step_dense(S)
        ref = next((t for t in (self.key_valid, self.document_ids, self.span_ids, self.branch_ids) if t is not None),
                   None)
        if device is None and ref is not None:
            device = ref.device
        qpos = torch.arange(self.q_offset, self.q_offset + T, device=device)
        kpos = torch.arange(S, device=device)
        allowed = torch.ones(1, T, S, dtype=torch.bool, device=device)
        # A decode step against a static cache sits at or past the last key: causality admits
        # every key there and only key_valid masks (built from key_valid alone, below).
        if self.causal and self.q_offset < S - 1:
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

    def _decode_step_dense(self, S: int) -> Tensor:
        """:meth:`dense` of one query at the last key position (a decode step against a static
        cache): the valid keys, or the query's own position when none is valid. Same values as the
        general path, in a handful of ops (it runs once per generated token)."""
        valid = self.key_valid[:, None, :].bool()  # [B, 1, S]
        own = torch.zeros_like(valid[:1])
        own[..., -1] = True
        return (valid | (own & ~valid.any(-1, keepdim=True)))[:, None]

    def query_has_keys(self, T: int, S: int, device=None) -> Tensor:
        """``[B, 1, T, 1]`` bool: False for cross-attention queries that precede every image."""
        return self.dense(T, S, device).any(-1, keepdim=True)


_KEY_INDEXED = ("key_valid", "document_ids", "span_ids", "branch_ids")


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> None:
    """The shape contract every backend relies on; raises ValueError naming what disagrees.

    ``q [B, Hq, T, Dh]``, ``k, v [B, Hkv, S, Dh]`` with ``Hq % Hkv == 0``; the mask's per-key
    tensors are ``[B or 1, S]`` and, where queries read them at ``q_offset + i``, cover
    ``q_offset + T <= S``; cross-attention's ``images_seen`` is ``[B or 1, T]``. Python-level
    checks only: nothing here reads tensor values (no device sync, nothing for a compiler to break on).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects 4-d q/k/v [B, H, T, Dh]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k disagree on batch or head dim: {tuple(q.shape)} vs {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    B, T, S = q.shape[0], q.shape[2], k.shape[2]
    if mask.q_offset < 0:
        raise ValueError(f"mask.q_offset must be >= 0; got {mask.q_offset}")
    for name in _KEY_INDEXED + ("key_image_ids",):
        values = getattr(mask, name)
        if values is None:
            continue
        if values.ndim != 2 or values.shape[0] not in (1, B) or values.shape[1] != S:
            raise ValueError(f"mask.{name} must be [B or 1, S] = [{B} or 1, {S}]; got {tuple(values.shape)}")
        if name in ("document_ids", "span_ids", "branch_ids") and mask.q_offset + T > S:
            raise ValueError(f"mask.{name} gives query ids at positions q_offset..q_offset+T-1 = "
                             f"{mask.q_offset}..{mask.q_offset + T - 1}, beyond its length S={S}")
    for name in ("images_seen", "images_before"):
        seen = getattr(mask, name)
        if seen is not None and (seen.ndim != 2 or seen.shape[0] not in (1, B) or seen.shape[1] != T):
            raise ValueError(f"mask.{name} must be [B or 1, T] = [{B} or 1, {T}]; got {tuple(seen.shape)}")
