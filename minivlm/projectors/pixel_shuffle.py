"""Pixel-shuffle projector (Idefics3 / SmolVLM; Laurençon et al. 2024; nanoVLM ``ModalityProjector``).

Trades sequence length for width: each ``r x r`` neighbourhood of patch tokens is concatenated
into one token, so ``P`` tokens of width ``D`` become ``P / r^2`` tokens of width ``D * r^2``, then
a Linear (or MLP) maps them to the text width. Fewer image tokens make the decoder cheaper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from minivlm.config import VLMConfig, require
from minivlm.projectors.mlp import gelu_mlp


def pixel_shuffle(x: Tensor, r: int) -> Tensor:
    """``[N, h*w, D] -> [N, (h/r)*(w/r), r*r*D]`` (space-to-depth on a square patch grid).

    Token order within a group is (row offset, column offset, channel), as in nanoVLM.
    """
    N, P, D = x.shape
    side = math.isqrt(P)
    if side * side != P:
        raise ValueError(f"pixel shuffle needs a square patch grid; got {P} tokens")
    if side % r:
        raise ValueError(f"pixel shuffle factor {r} does not divide the {side}x{side} patch grid")
    return rearrange(x, "n (h r1 w r2) d -> n (h w) (r1 r2 d)", h=side // r, r1=r, w=side // r, r2=r)


class PixelShuffleProjector(nn.Module):
    """``[N, P, D_img] -> [N, P / r^2, D_txt]``."""

    @classmethod
    def check_config(cls, config: VLMConfig) -> None:
        e, r = config.encoder, config.projector.shuffle_factor
        require(e.grid_size % r == 0, "projector.shuffle_factor",
                f"{r} does not divide the {e.grid_size}x{e.grid_size} patch grid "
                f"(image_size {e.image_size} / patch_size {e.patch_size})")

    @classmethod
    def output_tokens(cls, config: VLMConfig, feature_tokens: int) -> int:
        return feature_tokens // config.projector.shuffle_factor**2

    @classmethod
    def patch_weights(cls, token_weights: Tensor, config: VLMConfig, own_attention: Sequence[Tensor] = ()) -> Tensor:
        """``[P / r^2] -> [P]``: token ``(y, x)`` of the coarse grid is the ``r x r`` patch block at
        ``(r*y, r*x)`` and shares its weight equally among them (mass is conserved)."""
        g, r = config.encoder.grid_size, config.projector.shuffle_factor
        if token_weights.numel() != (g // r) ** 2:
            raise ValueError(f"pixel_shuffle (r={r}): expected {(g // r) ** 2} image tokens, got {token_weights.numel()}")
        block = torch.full((r, r), 1.0 / (r * r), dtype=token_weights.dtype, device=token_weights.device)
        return torch.kron(token_weights.view(g // r, g // r), block).flatten()

    def __init__(self, config: VLMConfig):
        super().__init__()
        p = config.projector
        self.factor = p.shuffle_factor
        in_dim = config.encoder.width * self.factor**2
        out = config.decoder.width
        self.mlp = gelu_mlp(in_dim, p.hidden_dim or out, out, p.depth, p.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.mlp(pixel_shuffle(features, self.factor))
