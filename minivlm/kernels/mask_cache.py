"""A per-mask memo for what kernels derive from an :class:`~minivlm.kernels.mask.AttentionMask`
(a FlexAttention ``BlockMask``, the Triton block schedule, SDPA's boolean matrix): one forward
calls attention once per layer with the same mask object, so the derived structure is built on the
first layer and reused by the others."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, Hashable, TypeVar

from torch import Tensor

from minivlm.kernels.mask import AttentionMask

__all__ = ["PerMaskCache"]

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
            None if t is None or t.is_inference() else t._version  # as _tensor_version, inlined: it runs per layer
            for t in (mask.key_valid, mask.document_ids, mask.span_ids, mask.branch_ids, mask.images_seen,
                      mask.key_image_ids, mask.images_before)
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
