"""The static key/value cache for incremental decoding (gpt-fast style).

Buffers are allocated once at ``[n_layers, B, Hkv, max_len, Dh]``; a forward writes its keys and
values at tensor columns. The write position is a tensor, so a one-token decode step has the same
shapes and the same Python state every time: ``torch.compile`` (and CUDA graphs) capture it once
for every step of every prompt, reading the *whole* buffer with :attr:`key_valid` marking the
columns that hold real tokens.

Eager decoding reads less. The cache also counts its written columns on the host (a Python int,
never a device read), so an eager forward reads only the columns written so far, and, while no
padding has been written, needs no key mask at all: a decode step is then an unmasked SDPA over
the written prefix (measured ~2.5x cheaper than the masked call over the whole buffer on the CPU).
A compiled step cannot follow the host count without a recompilation per step, so the first
compiled step switches the cache to whole-buffer reads for good.

The cache's own state is keys and values. A part with decoding state of its own (cross-attention's
prefilled images) keeps it in :attr:`StaticKVCache.part_state`, under its own key: the cache
never reads it, and it goes with the cache.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StaticKVCache:
    """Per-layer key/value buffers, the columns holding real tokens, and the write position.

    One forward of ``T`` new tokens: :meth:`reserve` claims columns ``[pos, pos + T)`` (and, for
    the model, records which of the new tokens are padding); each decoder layer calls
    :meth:`update`; the decoder calls :meth:`advance` after its last layer. Attention reads the
    first :attr:`read_len` columns, masked by :meth:`attention_key_valid`.

    Attributes:
        k, v: ``[n_layers, B, Hkv, max_len, Dh]``.
        key_valid: ``[B, max_len]`` bool, True where a real token has been written.
        position: ``[1]`` long, the next column to write.
        tokens_seen: ``[B]`` long, real tokens per row so far: the rotary position of the next one.
        part_state: ``{part: state}``, what other parts keep per generation (opaque to the cache).
        read_len: the key columns the running forward's attention reads: the columns written
            including this forward's (eager), or ``max_len`` (whole-buffer reads).
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
        self.read_len = max_len
        # Columns written, counted on the host; None once a compiled step has written (whole-buffer reads).
        self._written: int | None = 0
        self._padded = False  # a padding column has been written: attention needs key_valid
        self._columns: Tensor | None = None  # the columns the running forward writes
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views, made once
        #: Decoding state of other parts for this cache, keyed by the part (module docstring).
        self.part_state: dict[object, object] = {}

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def pos(self) -> int:
        """Columns written so far (reads the device once whole-buffer reads are on: not for a compiled step)."""
        return self._written if self._written is not None else int(self.position)

    @property
    def reads_whole_buffer(self) -> bool:
        """True once a compiled step has written: every forward then reads all ``max_len`` columns."""
        return self._written is None

    def buffers(self) -> tuple[Tensor, ...]:
        """Every tensor a forward writes in place (for ``torch._dynamo.mark_static_address``)."""
        return self.k, self.v, self.key_valid, self.position, self.tokens_seen

    def reserve(self, T: int, valid: Tensor | None = None) -> tuple[int, Tensor]:
        """Claim the next ``T`` columns for one forward; ``valid [B, T]`` marks its real tokens.

        Returns ``(q_offset, positions [B, T])``: the absolute column of query 0 as the attention
        mask needs it, and the rotary positions of the new tokens (real tokens counted, padding
        at the last real position).

        Eager, the offset is the host count of written columns. Under ``torch.compile`` a
        one-token step gets ``q_offset = max_len - 1``: it is the newest token, so a causal rule
        placed at the buffer's last column admits every written key and :attr:`key_valid` does
        the masking; nothing here reads the device or a changing Python value then.

        Raises:
            ValueError: the tokens do not fit (a compiled one-token step past the end fails in
                the write instead).
        """
        device = self.position.device
        if torch.compiler.is_compiling():
            self._written = None  # the host count cannot follow a compiled step: whole-buffer reads from now on
        if self._written is None and T == 1:
            q_offset = self.max_len - 1
            self._columns = self.position
        else:
            q_offset = self.pos  # a device read only for several tokens after a compiled step
            if q_offset + T > self.max_len:
                raise ValueError(f"KV cache overflow: writing positions up to {q_offset + T} into a cache of "
                                 f"length {self.max_len}")
            self._columns = self.position if T == 1 else self.position + torch.arange(T, device=device)
        self.read_len = self.max_len if self._written is None else self._written + T
        if valid is None:  # every new token is real (the decode steps): fewer ops on the hot path
            self.key_valid.index_fill_(1, self._columns, True)
            positions = self.tokens_seen[:, None] + torch.arange(T, device=device)
            self.tokens_seen.add_(T)
            return q_offset, positions
        valid = valid.to(torch.bool)
        if self._written is not None and not self._padded:
            self._padded = not bool(valid.all())  # eager only: one host read per forward given a mask
        self.key_valid.index_copy_(1, self._columns, valid)
        positions = (self.tokens_seen[:, None] + valid.long().cumsum(1) - 1).clamp_min(0)
        self.tokens_seen.add_(valid.sum(1))
        return q_offset, positions

    def attention_key_valid(self) -> Tensor | None:
        """The running forward's key mask ``[B, read_len]``, or None when every column it reads is
        real (eager reads with no padding written): attention then needs no mask tensor."""
        if self._written is None:
            return self.key_valid
        return self.key_valid[:, : self.read_len] if self._padded else None

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v [B, Hkv, T, Dh]`` at the reserved columns; return the ``[B, Hkv, read_len, Dh]``
        keys and values attention reads."""
        if self._columns is None:  # a decoder driven without the model: claim the columns here
            self.reserve(k.shape[2])
        k_all, v_all = self._layers[layer]
        k_all.index_copy_(2, self._columns, k)
        v_all.index_copy_(2, self._columns, v)
        if self._written is None:
            return k_all, v_all
        return k_all[:, :, : self.read_len], v_all[:, :, : self.read_len]

    def advance(self, n: int) -> None:
        """Move the write position past the ``n`` columns every layer has written."""
        self.position.add_(n)
        if self._written is not None:
            self._written += n
        self._columns = None
