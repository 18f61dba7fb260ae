"""Gated cross-attention (Flamingo; Alayrac et al. 2022, "GATED XATTN-DENSE").

Image tokens stay out of the text stream: each image is one ``<image>`` marker token in the
text, and before every ``every``-th decoder layer a block lets text attend to the projected
image tokens::

    h = h + tanh(alpha_attn) * CrossAttn(norm(h), images)
    h = h + tanh(alpha_ffw)  * FFW(norm(h))

``alpha`` starts at 0, so at initialisation the decoder computes exactly what it computed
without images. A text token sees the images whose marker is at or before it (all preceding
images of its sample); tokens before the first image see none and receive no update. In a packed
row (several documents, ``document_ids``) a token sees only its own document's images.

Keys are the image tokens of the whole batch, ``[N * P, D]``, shared by every row; each row's
mask admits only its own images (:meth:`AttentionMask.cross`). Every shape then follows from the
inputs' shapes, with no count read back from the device, so the forward compiles as one graph.

Decoding: the prefill's images (:class:`CrossAttentionState`) are the fusion's own state for the
KV cache they were prefilled into, kept in the cache's opaque per-part slot
(:attr:`StaticKVCache.part_state`, keyed by this module) so they live and die with it; decode
steps bring no image and reuse them. (A ``WeakKeyDictionary`` on the fusion, keyed by the cache,
broke ``torch.compile``: the compiler guards on the dictionary's entries, and a dead cache
collected while it traced removed one under it.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minivlm.config import VLMConfig, require
from minivlm.fusion.base import FusedInputs
from minivlm.kernels.dispatch import attention
from minivlm.kernels.mask import AttentionMask
from minivlm.layers.mlp import SwiGLU
from minivlm.layers.norms import RMSNorm


class GatedCrossAttentionBlock(nn.Module):
    """``h [B, T, D], images [B or 1, S, D] -> h [B, T, D]`` with tanh gates initialised to 0."""

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
        Bi, S, hd = images.shape[0], images.shape[1], D // self.n_heads
        q = self.q(self.attn_norm(h)).view(B, T, self.n_heads, hd).transpose(1, 2)
        # Images shared by the batch ([1, S, D]) are projected once and broadcast to every row.
        k = self.k(images).view(Bi, S, self.n_heads, hd).transpose(1, 2).expand(B, -1, -1, -1)
        v = self.v(images).view(Bi, S, self.n_heads, hd).transpose(1, 2).expand(B, -1, -1, -1)
        att = attention(q, k, v, mask, backend=self.attention_backend).transpose(1, 2).reshape(B, T, D)
        h = h + torch.tanh(self.attn_gate) * self.o(att)
        # Flamingo gates the dense layer too; queries without images still pass through the FFW,
        # which is why the zero initial gate (not the mask) is what keeps the decoder unchanged.
        return h + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(h))


@dataclass
class CrossAttentionState:
    """What cross-attention needs besides the text: the image keys and which row may see which.

    images: ``[1, N * P, D]`` the projected image tokens of the whole batch (image-major).
    key_image_ids: ``[B, N * P]`` for row ``b``, the index of each key's image among that row's
        images, -1 for the images of other rows.
    images_seen: ``[B]`` images seen by each row's last processed token (decoding continues there).
    """

    images: Tensor
    key_image_ids: Tensor
    images_seen: Tensor


def image_keys(image_embeds: Tensor, is_marker: Tensor) -> tuple[Tensor, Tensor]:
    """``image_embeds [N, P, D]`` and the markers ``[B, T]`` -> ``(images [1, N * P, D],
    key_image_ids [B, N * P])``; image ``g`` belongs to the row holding the ``g``-th marker
    (row-major), where it is that row's image number ``g - first[row]``."""
    N, P, D = image_embeds.shape
    B = is_marker.shape[0]
    ends = torch.cumsum(is_marker.sum(1), 0)  # [B] images up to and including each row
    g = torch.arange(N, device=image_embeds.device)
    row_of = (ends[None, :] <= g[:, None]).sum(1)  # [N] the row of image g
    local = g - (ends - is_marker.sum(1)).gather(0, row_of.clamp(max=B - 1))  # [N] its index in that row
    rows = torch.arange(B, device=image_embeds.device)
    key_ids = torch.where(row_of[None, :] == rows[:, None], local[None, :], -1)  # [B, N]
    return image_embeds.reshape(1, N * P, D), key_ids.repeat_interleave(P, dim=1)


def images_before_document(is_marker: Tensor, document_ids: Tensor) -> Tensor:
    """``[B, T]``: image markers of the row before the first token of each token's document.

    ``document_ids [B, T]`` gives contiguous documents (packing). The exclusive marker count is
    non-decreasing along a row, so its value at each document's first token, carried forward
    by a running maximum, is the count before that document.
    """
    before = torch.cumsum(is_marker.long(), dim=1) - is_marker.long()  # markers strictly before t
    starts = torch.ones_like(is_marker)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.where(starts, before, torch.zeros_like(before)).cummax(dim=1).values


class CrossAttentionFusion(nn.Module):
    """Owns ``ceil(n_layers / every)`` gated blocks and hands the decoder a layer hook."""

    #: Images stay out of the text stream; the fusion's own blocks attend to them (part contract).
    images_in_text_stream = False

    @classmethod
    def check_config(cls, config: VLMConfig) -> None:
        d, f = config.decoder, config.fusion
        heads = f.n_heads or d.n_heads
        require(d.width % heads == 0, "fusion.n_heads", f"decoder.width={d.width} is not divisible by {heads}")
        require(f.every <= d.n_layers, "fusion.every", f"{f.every} exceeds decoder.n_layers={d.n_layers}")

    @classmethod
    def placeholders_per_image(cls, config: VLMConfig, image_tokens: int) -> int:
        """One ``<image>`` marker per image: it tells the text where the image was shown."""
        return 1

    def __init__(self, config: VLMConfig):
        super().__init__()
        d, f = config.decoder, config.fusion
        self.image_token_id = config.image_token_id
        self.every = f.every
        n_blocks = math.ceil(d.n_layers / f.every)
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(d.width, f.n_heads or d.n_heads, d.mlp_dim, d.norm_eps) for _ in range(n_blocks)
        )

    def forward(self, text_embeds: Tensor, image_embeds: Tensor | None, input_ids: Tensor, mask: AttentionMask,
                cache=None) -> FusedInputs:
        is_marker = input_ids == self.image_token_id
        if image_embeds is not None:
            images, key_ids = image_keys(image_embeds, is_marker)
            state = CrossAttentionState(images, key_ids, torch.zeros_like(is_marker[:, 0], dtype=torch.long))
        else:  # text only, or a decode step: the images this cache was prefilled with, if any
            state = None if cache is None else cache.part_state.get(self)
        if state is None:
            return FusedInputs(text_embeds, mask)
        seen = state.images_seen[:, None] + torch.cumsum(is_marker.long(), dim=1)  # [B, T]
        if cache is not None and image_embeds is not None:  # a prefill: keep the images for the decode steps
            cache.part_state[self] = CrossAttentionState(state.images, state.key_image_ids, seen[:, -1].clone())
        elif cache is not None:  # a decode step: same state object, updated in place (one compiled graph)
            state.images_seen.copy_(seen[:, -1])
        # Packed rows: the images of earlier documents are not this token's to see.
        before = None if mask.document_ids is None else images_before_document(is_marker, mask.document_ids)
        cross_mask = AttentionMask.cross(seen, state.key_image_ids, before)

        def hook(layer: int, h: Tensor) -> Tensor:
            if layer % self.every:
                return h
            out = self.blocks[layer // self.every](h, state.images.to(h.dtype), cross_mask)
            # Tokens that have seen no image (text-only rows, text before the first image of
            # their document) pass through unchanged, so a row decodes the same alone or batched
            # with image rows, and a packed document as it would alone.
            return torch.where(seen[..., None] > (0 if before is None else before[..., None]), out, h)

        return FusedInputs(text_embeds, mask, hook)
