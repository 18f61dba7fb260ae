"""A pre-allocated (static) key/value cache for incremental decoding.

Buffers are allocated once at ``[n_layers, B, Hkv, max_len, Dh]`` so the decode step has fixed
shapes (what ``torch.compile`` / CUDA graphs need); each step writes its keys in place.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StaticKVCache:
    """Per-layer key/value buffers with a shared write position.

    ``update(layer, k, v)`` writes ``k, v [B, Hkv, T, Dh]`` at positions ``[pos, pos + T)`` and
    returns the valid prefix ``[B, Hkv, pos + T, Dh]``; ``advance(T)`` moves the position once all
    layers have written (the decoder calls it after its last layer).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0
        # Fusion state that must outlive the prefill (cross-attention keeps its image keys here).
        self.cross_context = None

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: writing positions up to {end} into a cache of length {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0
        self.cross_context = None
