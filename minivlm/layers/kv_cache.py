"""The static key/value cache for incremental decoding (gpt-fast style).

Buffers are allocated once at ``[n_layers, B, Hkv, max_len, Dh]``; a forward writes its keys and
values at tensor columns and attention reads the *whole* buffer, with :attr:`key_valid` marking
the columns that hold real tokens. The write position is a tensor too, so a one-token decode step
has the same shapes and the same Python state every time: ``torch.compile`` (and CUDA graphs)
capture it once for every step of every prompt.

The cache holds keys and values only; a part with its own decoding state (cross-attention's
images) keeps it itself, per cache.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StaticKVCache:
    """Per-layer key/value buffers, the columns holding real tokens, and the write position.

    One forward of ``T`` new tokens: :meth:`reserve` claims columns ``[pos, pos + T)`` (and, for
    the model, records which of the new tokens are padding); each decoder layer calls
    :meth:`update`; the decoder calls :meth:`advance` after its last layer.

    Attributes:
        k, v: ``[n_layers, B, Hkv, max_len, Dh]``.
        key_valid: ``[B, max_len]`` bool, True where a real token has been written.
        position: ``[1]`` long, the next column to write.
        tokens_seen: ``[B]`` long, real tokens per row so far: the rotary position of the next one.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.tokens_seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len
        self._columns: Tensor | None = None  # the columns the running forward writes
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views, made once

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def pos(self) -> int:
        """Columns written so far (reads the device: not for a compiled step)."""
        return int(self.position)

    def buffers(self) -> tuple[Tensor, ...]:
        """Every tensor a forward writes in place (for ``torch._dynamo.mark_static_address``)."""
        return self.k, self.v, self.key_valid, self.position, self.tokens_seen

    def reserve(self, T: int, valid: Tensor | None = None) -> tuple[int, Tensor]:
        """Claim the next ``T`` columns for one forward; ``valid [B, T]`` marks its real tokens.

        Returns ``(q_offset, positions [B, T])``: the absolute column of query 0 as the attention
        mask needs it, and the rotary positions of the new tokens (real tokens counted, padding
        at the last real position). A one-token step gets ``q_offset = max_len - 1``: it is the
        newest token, so a causal rule placed at the buffer's last column admits every written
        key and :attr:`key_valid` does the masking; nothing here reads the device then. Several
        tokens need their true offset, read from the device once.

        Raises:
            ValueError: the tokens do not fit (checked for several tokens; a one-token step past
                the end fails in the write).
        """
        if T == 1:
            q_offset = self.max_len - 1
            self._columns = self.position
        else:
            q_offset = int(self.position)
            if q_offset + T > self.max_len:
                raise ValueError(f"KV cache overflow: writing positions up to {q_offset + T} into a cache of "
                                 f"length {self.max_len}")
            self._columns = self.position + torch.arange(T, device=self.position.device)
        if valid is None:  # every new token is real (the decode steps): fewer ops on the hot path
            self.key_valid.index_fill_(1, self._columns, True)
            positions = self.tokens_seen[:, None] + torch.arange(T, device=self.position.device)
            self.tokens_seen.add_(T)
            return q_offset, positions
        valid = valid.to(torch.bool)
        self.key_valid.index_copy_(1, self._columns, valid)
        positions = (self.tokens_seen[:, None] + valid.long().cumsum(1) - 1).clamp_min(0)
        self.tokens_seen.add_(valid.sum(1))
        return q_offset, positions

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v [B, Hkv, T, Dh]`` at the reserved columns; return the whole
        ``[B, Hkv, max_len, Dh]`` buffers of ``layer``."""
        if self._columns is None:  # a decoder driven without the model: claim the columns here
            self.reserve(k.shape[2])
        k_all, v_all = self._layers[layer]
        k_all.index_copy_(2, self._columns, k)
        v_all.index_copy_(2, self._columns, v)
        return k_all, v_all

    def advance(self, n: int) -> None:
        """Move the write position past the ``n`` columns every layer has written."""
        self.position.add_(n)
        self._columns = None
