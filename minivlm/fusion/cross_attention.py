"""Gated cross-attention (Flamingo; Alayrac et al. 2022, "GATED XATTN-DENSE").

Image tokens stay out of the text stream: each image is one ``<image>`` marker token in the
text, and before every ``every``-th decoder layer a block lets text attend to the projected
image tokens::

    h = h + tanh(alpha_attn) * CrossAttn(norm(h), images)
    h = h + tanh(alpha_ffw)  * FFW(norm(h))

``alpha`` starts at 0, so at initialisation the decoder computes exactly what it computed
without images. A text token sees the images whose marker is at or before it (all preceding
images of its sample); tokens before the first image see none and receive no update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minivlm.config import VLMConfig
from minivlm.fusion.base import FusedInputs, placeholder_mask
from minivlm.kernels.dispatch import attention
from minivlm.kernels.mask import AttentionMask
from minivlm.layers.kv_cache import StaticKVCache
from minivlm.layers.mlp import SwiGLU
from minivlm.layers.norms import RMSNorm
from minivlm.registry import FUSIONS


class GatedCrossAttentionBlock(nn.Module):
    """``h [B, T, D], images [B, S, D] -> h [B, T, D]`` with tanh gates initialised to 0."""

    def __init__(self, dim: int, n_heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = RMSNorm(dim, eps)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, mlp_dim)
        self.mlp_gate = nn.Parameter(torch.zeros(1))
        self.attention_backend: str | None = None  # None: dispatch's default (kernels.dispatch)

    def forward(self, h: Tensor, images: Tensor, mask: AttentionMask) -> Tensor:
        B, T, D = h.shape
        S, hd = images.shape[1], D // self.n_heads
        q = self.q(self.attn_norm(h)).view(B, T, self.n_heads, hd).transpose(1, 2)
        k = self.k(images).view(B, S, self.n_heads, hd).transpose(1, 2)
        v = self.v(images).view(B, S, self.n_heads, hd).transpose(1, 2)
        att = attention(q, k, v, mask, backend=self.attention_backend).transpose(1, 2).reshape(B, T, D)
        h = h + torch.tanh(self.attn_gate) * self.o(att)
        # Flamingo gates the dense layer too; queries without images still pass through the FFW,
        # which is why the zero initial gate (not the mask) is what keeps the decoder unchanged.
        return h + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(h))


@dataclass
class CrossAttentionContext:
    """Per-row image keys kept on the KV cache so decode steps need not re-encode images.

    images: ``[B, M * P, D]`` image tokens of each row (M = most images in a row), zero-padded.
    key_image_ids: ``[B, M * P]`` image index of each key within its row, -1 for padding.
    images_seen: ``[B]`` images seen by the last processed token of each row.
    """

    images: Tensor
    key_image_ids: Tensor
    images_seen: Tensor


@FUSIONS.register("cross_attention")
class CrossAttentionFusion(nn.Module):
    """Owns ``ceil(n_layers / every)`` gated blocks and hands the decoder a layer hook."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        d, f = config.decoder, config.fusion
        self.image_token_id = config.image_token_id
        self.every = f.every
        n_blocks = math.ceil(d.n_layers / f.every)
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(d.width, f.n_heads or d.n_heads, d.mlp_dim, d.norm_eps) for _ in range(n_blocks)
        )

    def _context(self, image_embeds: Tensor, is_marker: Tensor) -> CrossAttentionContext:
        B = is_marker.shape[0]
        N, P, D = image_embeds.shape
        per_row = is_marker.sum(1)  # images per row, in row-major order
        M = int(per_row.max()) if B else 0
        images = image_embeds.new_zeros(B, M, P, D)
        key_ids = torch.full((B, M, P), -1, dtype=torch.long, device=image_embeds.device)
        row = torch.repeat_interleave(torch.arange(B, device=image_embeds.device), per_row)
        first = torch.cumsum(per_row, 0) - per_row
        local = torch.arange(N, device=image_embeds.device) - first[row]
        images = images.index_put((row, local), image_embeds)
        key_ids[row, local] = local[:, None]
        return CrossAttentionContext(images.view(B, M * P, D), key_ids.view(B, M * P), torch.zeros_like(per_row))

    def forward(self, text_embeds: Tensor, image_embeds: Tensor | None, input_ids: Tensor, mask: AttentionMask,
                cache: StaticKVCache | None = None) -> FusedInputs:
        if mask.document_ids is not None:
            raise ValueError("cross_attention fusion does not support packed sequences (document_ids); "
                             "disable data.packing or use the splice/prefix fusion")
        n = 0 if image_embeds is None else image_embeds.shape[0]
        ctx: CrossAttentionContext | None = getattr(cache, "cross_context", None) if cache is not None else None
        if n == 0 and ctx is not None:
            # Decode step: new tokens bring no image. (No count check here: it would force a
            # host sync and break torch.compile's graph on every step.)
            is_marker = input_ids == self.image_token_id
        else:
            is_marker = placeholder_mask(input_ids, self.image_token_id, n, 1)
            if n == 0:
                return FusedInputs(text_embeds, mask)
            ctx = self._context(image_embeds, is_marker)
        seen = ctx.images_seen[:, None] + torch.cumsum(is_marker.long(), dim=1)  # [B, T]
        if cache is not None:
            cache.cross_context = CrossAttentionContext(ctx.images, ctx.key_image_ids, seen[:, -1])
        cross_mask = AttentionMask.cross(seen, ctx.key_image_ids)

        def hook(layer: int, h: Tensor) -> Tensor:
            if layer % self.every:
                return h
            out = self.blocks[layer // self.every](h, ctx.images.to(h.dtype), cross_mask)
            # Tokens that have seen no image (text-only rows, text before the first image) pass
            # through unchanged, so a row decodes the same alone or batched with image rows.
            return torch.where(seen[..., None] > 0, out, h)

        return FusedInputs(text_embeds, mask, hook)
