"""Token splice (LLaVA; Liu et al. 2023): projected image tokens replace ``<image>`` placeholders.

The processor expands each image into ``image_tokens`` placeholder ids; here their embeddings are
overwritten, in row-major order, by the projected image tokens. Any number of images per
sample works, including none, with different counts across the batch.
"""

from __future__ import annotations

from torch import Tensor, nn

from minivlm.config import VLMConfig
from minivlm.fusion.base import FusedInputs, placeholder_mask
from minivlm.kernels.mask import AttentionMask
from minivlm.layers.kv_cache import StaticKVCache
from minivlm.registry import FUSIONS


def splice(text_embeds: Tensor, image_embeds: Tensor | None, input_ids: Tensor, image_token_id: int,
           tokens_per_image: int) -> tuple[Tensor, Tensor]:
    """Returns ``(embeds [B, T, D], is_image [B, T])``; ``image_embeds [N, P, D]`` or None."""
    n = 0 if image_embeds is None else image_embeds.shape[0]
    is_image = placeholder_mask(input_ids, image_token_id, n, tokens_per_image)
    if n == 0:
        return text_embeds, is_image
    # masked_scatter fills True positions in row-major order and is differentiable in both inputs.
    embeds = text_embeds.masked_scatter(is_image[..., None], image_embeds.to(text_embeds.dtype))
    return embeds, is_image


@FUSIONS.register("splice")
class SpliceFusion(nn.Module):
    """``(text [B, T, D], images [N, P, D]) -> FusedInputs`` with images in the token stream."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.image_token_id = config.image_token_id
        self.tokens_per_image = config.image_tokens

    def forward(self, text_embeds: Tensor, image_embeds: Tensor | None, input_ids: Tensor, mask: AttentionMask,
                cache: StaticKVCache | None = None) -> FusedInputs:
        embeds, _ = splice(text_embeds, image_embeds, input_ids, self.image_token_id, self.tokens_per_image)
        return FusedInputs(embeds, mask)
