"""Perceiver resampler (Flamingo, Alayrac et al. 2022; Jaegle et al. 2021).

A fixed set of learned latent queries cross-attends to the image features (and to themselves),
so any number of patches becomes ``n_latents`` tokens. As in Flamingo, keys/values are the
concatenation of the features and the latents.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from minivlm.config import VLMConfig, require
from minivlm.kernels.dispatch import attention
from minivlm.kernels.mask import AttentionMask
from minivlm.layers.mlp import MLP
from minivlm.layers.norms import LayerNorm

_FULL = AttentionMask.bidirectional()


class ResamplerLayer(nn.Module):
    """``latents [N, L, D], features [N, P, D] -> latents [N, L, D]``."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm_latents = LayerNorm(dim)
        self.norm_features = LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.norm_mlp = LayerNorm(dim)
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


class ResamplerProjector(nn.Module):
    """``[N, P, D_img] -> [N, n_latents, D_txt]``."""

    @classmethod
    def check_config(cls, config: VLMConfig) -> None:
        d, p = config.decoder, config.projector
        require(d.width % p.n_heads == 0, "projector.n_heads",
                f"decoder.width={d.width} is not divisible by projector.n_heads={p.n_heads}")

    @classmethod
    def output_tokens(cls, config: VLMConfig, feature_tokens: int) -> int:
        return config.projector.n_latents

    @classmethod
    def patch_weights(cls, token_weights: Tensor, config: VLMConfig, own_attention: Sequence[Tensor] = ()) -> Tensor:
        """``[n_latents] -> [P]``: each latent's weight spread over the patches in proportion to that
        latent's attention onto them, averaged over heads and layers (``own_attention``: per
        resampler layer ``[H, L, P + L]``, keys are patches then latents; the latent-to-latent part
        is dropped and rows renormalised). An approximation: later layers' latents also carry what
        earlier latents gathered.

        Raises:
            ValueError: no recorded attention, or one latent count for the weights and another recorded.
        """
        if not own_attention:
            raise ValueError("resampler projector: its latents' attention onto the patches is needed "
                             "(record it with minivlm.explain.record_attention)")
        P = config.encoder.n_patches
        to_patches = torch.stack([a.double().mean(0)[:, :P] for a in own_attention]).mean(0)  # [L, P]
        to_patches = to_patches / to_patches.sum(-1, keepdim=True).clamp_min(1e-12)
        if to_patches.shape[0] != token_weights.numel():
            raise ValueError(f"resampler: {to_patches.shape[0]} latents recorded but {token_weights.numel()} "
                             f"token weights given")
        return (token_weights.double() @ to_patches).to(token_weights.dtype)

    def __init__(self, config: VLMConfig):
        super().__init__()
        p, D = config.projector, config.decoder.width
        self.input_proj = nn.Linear(config.encoder.width, D)
        self.latents = nn.Parameter(torch.randn(p.n_latents, D) * D**-0.5)
        self.layers = nn.ModuleList(ResamplerLayer(D, p.n_heads) for _ in range(p.n_layers))
        self.norm = LayerNorm(D)

    def forward(self, features: Tensor) -> Tensor:
        x = self.input_proj(features)
        latents = self.latents.expand(x.shape[0], -1, -1).to(x.dtype)
        for layer in self.layers:
            latents = layer(latents, x)
        return self.norm(latents)
