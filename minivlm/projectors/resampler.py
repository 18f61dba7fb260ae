"""Perceiver resampler (Flamingo, Alayrac et al. 2022; Jaegle et al. 2021).

A fixed set of learned latent queries cross-attends to the image features (and to themselves),
so any number of patches becomes ``n_latents`` tokens. As in Flamingo, keys/values are the
concatenation of the features and the latents.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from minivlm.config import VLMConfig
from minivlm.kernels.dispatch import attention
from minivlm.kernels.mask import AttentionMask
from minivlm.layers.mlp import MLP
from minivlm.registry import PROJECTORS

_FULL = AttentionMask.bidirectional()


class ResamplerLayer(nn.Module):
    """``latents [N, L, D], features [N, P, D] -> latents [N, L, D]``."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm_latents = nn.LayerNorm(dim)
        self.norm_features = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim, bias=False)
        self.attention_backend: str | None = None  # None: dispatch's default (kernels.dispatch)

    def forward(self, latents: Tensor, features: Tensor) -> Tensor:
        N, L, D = latents.shape
        h, dh = self.n_heads, D // self.n_heads
        lat = self.norm_latents(latents)
        kv_in = torch.cat([self.norm_features(features), lat], dim=1)
        q = self.q(lat).view(N, L, h, dh).transpose(1, 2)
        k, v = self.kv(kv_in).view(N, kv_in.shape[1], 2, h, dh).permute(2, 0, 3, 1, 4)
        att = attention(q, k, v, _FULL, backend=self.attention_backend).transpose(1, 2).reshape(N, L, D)
        latents = latents + self.out(att)
        return latents + self.mlp(self.norm_mlp(latents))


@PROJECTORS.register("resampler")
class ResamplerProjector(nn.Module):
    """``[N, P, D_img] -> [N, n_latents, D_txt]``."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        p, D = config.projector, config.decoder.width
        self.input_proj = nn.Linear(config.encoder.width, D)
        self.latents = nn.Parameter(torch.randn(p.n_latents, D) * D**-0.5)
        self.layers = nn.ModuleList(ResamplerLayer(D, p.n_heads) for _ in range(p.n_layers))
        self.norm = nn.LayerNorm(D)

    def forward(self, features: Tensor) -> Tensor:
        x = self.input_proj(features)
        latents = self.latents.expand(x.shape[0], -1, -1).to(x.dtype)
        for layer in self.layers:
            latents = layer(latents, x)
        return self.norm(latents)
