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

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


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
