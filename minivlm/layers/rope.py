"""Rotary position embeddings (Su et al. 2021, RoFormer) in the Llama "rotate half" layout."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Produces ``cos, sin`` of shape ``[B, T, Dh]`` for integer ``position_ids [B, T]``.

    Positions are explicit rather than implied by the sequence index so that packed documents
    restart at 0 and left-padded prompts start their real tokens at 0.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

        self._table: tuple[tuple, Tensor] | None = None  # (key, [L, 2, Dh] cos and signed sin): see tables()

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def tables(self, position_ids: Tensor, dtype: torch.dtype, limit: int | None = None) -> tuple[Tensor, Tensor]:
        """:func:`rope_tables` of ``position_ids [B, T]``: ``(cos, signed_sin) [B, 1, T, Dh]`` in ``dtype``.

        ``limit``, when the caller knows one on the host (a KV cache's length: the cache counted
        the positions), bounds the positions from above. The tables are then rows of a table
        computed once for positions ``0 .. limit - 1``, the same values in one lookup instead
        of a dozen operators per forward (a decode step is bound by operator count). Without a
        limit (training positions are not bounded by a length known here), or while compiling
        (the compiler fuses the computation), they are computed.
        """
        if limit is None or torch.compiler.is_compiling():
            return rope_tables(*self(position_ids), dtype)
        inv_freq = self.inv_freq
        key = (inv_freq.data_ptr(), inv_freq._version, inv_freq.dtype, inv_freq.device, dtype)
        if self._table is None or self._table[0] != key or self._table[1].shape[0] < limit:
            # A plain tensor even when first asked in inference mode: forwards outside it read it too.
            # Built in the caller's dtype (rope_tables casts once), so a step does not cast.
            with torch.inference_mode(False):
                cos, sin = rope_tables(*self(torch.arange(limit, device=inv_freq.device)[None]), dtype)
                self._table = (key, torch.stack((cos[0, 0], sin[0, 0]), dim=1))  # [L, 2, Dh]
        return self._table[1][position_ids].unsqueeze(1).unbind(-2)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(cos: Tensor, sin: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos, sin [B, T, Dh]`` -> ``(cos, signed_sin) [B, 1, T, Dh]`` in ``dtype``, for :func:`rotate`.

    Built once per forward and shared by every layer. ``signed_sin`` carries the sign of
    :func:`rotate_half`: ``rotate_half(x) * sin == x.roll(Dh / 2) * signed_sin`` exactly.
    """
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos[:, None].to(dtype), signed[:, None].to(dtype)


def rotate(x: Tensor, tables: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate ``x [B, H, T, Dh]`` by position with :func:`rope_tables` (same values as :func:`apply_rope`)."""
    cos, signed_sin = tables
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, T, Dh]`` by position; ``cos, sin [B, T, Dh]``. Computed in x's dtype after fp32 tables."""
    return rotate(x, rope_tables(cos, sin, x.dtype))
