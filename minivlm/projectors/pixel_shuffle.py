"""Pixel-shuffle projector (Idefics3 / SmolVLM; Laurençon et al. 2024; nanoVLM ``ModalityProjector``).

Trades sequence length for width: each ``r x r`` neighbourhood of patch tokens is concatenated
into one token, so ``P`` tokens of width ``D`` become ``P / r^2`` tokens of width ``D * r^2``, then
a Linear (or MLP) maps them to the text width. Fewer image tokens make the decoder cheaper.
"""

from __future__ import annotations

import math

from einops import rearrange
from torch import Tensor, nn

from minivlm.config import VLMConfig
from minivlm.projectors.mlp import gelu_mlp
from minivlm.registry import PROJECTORS


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


@PROJECTORS.register("pixel_shuffle")
class PixelShuffleProjector(nn.Module):
    """``[N, P, D_img] -> [N, P / r^2, D_txt]``."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        p = config.projector
        self.factor = p.shuffle_factor
        in_dim = config.encoder.width * self.factor**2
        out = config.decoder.width
        self.mlp = gelu_mlp(in_dim, p.hidden_dim or out, out, p.depth, p.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.mlp(pixel_shuffle(features, self.factor))
