"""How a mask description reaches a kernel: the default backend per (mask kind, device) and a
per-mask memo for the metadata that fused kernels derive from an :class:`AttentionMask`.

Backend choice (measured on one H200, see ``/work/shared/DESIGN.md``):

* plain ``causal`` / ``bidirectional`` masks go to SDPA everywhere: without a mask tensor SDPA
  takes its flash (or cuDNN) path, which no masked kernel beats;
* on CUDA, masks SDPA can only take as a boolean matrix (``prefix_lm``, ``documents``, padded
  kinds) go to FlexAttention, which skips dead blocks (prefix-LM 273 vs 127 TFLOP/s for SDPA with
  a boolean mask; 8 packed documents 80 vs 16). The Triton kernel in
  :mod:`minivlm.kernels.triton_attention` serves the same kinds and measured faster than flex in
  one H200 run (bf16, B4 H16 S4096 Dh64, fwd / fwd+bwd TFLOP/s of useful work: prefix-LM
  298 / 278 vs 182 / 227, 8 packed documents 103 / 113 vs 40 / 73); flex stays the default until
  the project's GPU benchmark confirms that;
* ``branches`` (shared-prefix packing) goes to flex on CUDA as well; the Triton kernel does not
  implement the branch rule and refuses such masks;
* on CPU everything goes to SDPA (with a boolean mask where needed): flex has no CPU backward and
  Triton runs on CPU only through its interpreter;
* ``cross`` (Flamingo) masks go to SDPA: neither fused kernel implements the cross rule.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, Hashable, TypeVar

from torch import Tensor

from minivlm.layers.attention import BACKENDS, AttentionMask

__all__ = ["MASK_KINDS", "default_backend", "PerMaskCache"]

#: Every value :attr:`AttentionMask.kind` can take.
MASK_KINDS = frozenset(
    {"causal", "bidirectional", "prefix_lm", "documents", "branches", "padded_causal", "padded_bidirectional", "cross"}
)
_PLAIN_KINDS = frozenset({"causal", "bidirectional"})
_BLOCK_SPARSE_KINDS = frozenset({"prefix_lm", "documents", "branches", "padded_causal", "padded_bidirectional"})


def default_backend(mask_kind: str, device_type: str) -> str:
    """Name of the backend :func:`minivlm.layers.attention.attention` should use by default.

    Args:
        mask_kind: :attr:`AttentionMask.kind`, e.g. ``"prefix_lm"``.
        device_type: ``torch.device.type`` of the query, e.g. ``"cuda"`` or ``"cpu"``.
    Returns:
        ``"sdpa"`` or ``"flex"``. ``"flex"`` is only returned when it is registered (it needs
        ``torch.nn.attention.flex_attention``); otherwise SDPA with a boolean mask serves.
    Raises:
        ValueError: ``mask_kind`` is not one of :data:`MASK_KINDS`.
    """
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {mask_kind!r}; expected one of {sorted(MASK_KINDS)}")
    if mask_kind in _PLAIN_KINDS or mask_kind == "cross":
        return "sdpa"
    if device_type == "cuda" and mask_kind in _BLOCK_SPARSE_KINDS and "flex" in BACKENDS:
        return "flex"
    return "sdpa"


_Value = TypeVar("_Value")


def _tensor_version(tensor: Tensor | None) -> int | None:
    """In-place version counter of ``tensor`` (None when absent or untracked).

    Inference-mode tensors keep no version counter; masks built under ``torch.inference_mode``
    are therefore assumed not to be modified in place (decoding builds a new mask per step).
    """
    if tensor is None or tensor.is_inference():
        return None
    return tensor._version


class PerMaskCache:
    """Memoises structures derived from an :class:`AttentionMask` (block masks, block schedules).

    One forward pass calls attention once per layer with the *same* mask object, so whatever a
    kernel derives from the mask (a FlexAttention ``BlockMask``, the Triton block schedule) is
    built on the first layer and reused by the others.

    Keying and invalidation:

    * by object identity (``id(mask)``), checked against a weak reference so a recycled id never
      returns a stale entry; an entry is dropped as soon as its mask is garbage collected;
    * plus the in-place version counters of the mask's tensors, so writing into
      ``mask.key_valid`` (or the other tensors) in place rebuilds rather than reusing stale data;
    * plus a caller ``extra_key`` holding everything else the structure depends on (shapes,
      device, block sizes).

    At most ``max_entries`` entries are kept, least recently used evicted first, which bounds the
    memory held for masks that are still alive (e.g. kept by a training loop).
    """

    def __init__(self, max_entries: int = 32) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[weakref.ref, object]] = OrderedDict()
        self.builds = 0  # number of cache misses, for tests and benchmarks

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, mask: AttentionMask, extra_key: Hashable, build: Callable[[], _Value]) -> _Value:
        """Return the cached value for ``(mask, extra_key)``, calling ``build()`` on a miss."""
        versions = tuple(
            _tensor_version(t)
            for t in (mask.key_valid, mask.document_ids, mask.span_ids, mask.branch_ids, mask.images_seen,
                      mask.key_image_ids)
        )
        key = (id(mask), versions, extra_key)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is mask:
            self._entries.move_to_end(key)
            return entry[1]  # type: ignore[return-value]
        value = build()
        self.builds += 1
        mask_id = id(mask)
        ref = weakref.ref(mask, lambda _ref: self._drop_mask(mask_id))
        self._entries[key] = (ref, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value

    def _drop_mask(self, mask_id: int) -> None:
        for key in [k for k in self._entries if k[0] == mask_id]:
            del self._entries[key]
