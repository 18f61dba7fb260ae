"""Token splice (LLaVA; Liu et al. 2023): projected image tokens replace ``<image>`` placeholders.

The processor expands each image into one placeholder id per projected image token; here their
embeddings are overwritten, in row-major order, by the projected image tokens. Any number of
images per sample works, including none, with different counts across the batch.
"""

from __future__ import annotations

from torch import Tensor, nn

from minivlm.config import VLMConfig
from minivlm.fusion.base import FusedInputs, splice_rows
from minivlm.kernels.mask import AttentionMask


def splice(text_embeds: Tensor, image_embeds: Tensor | None, input_ids: Tensor,
           image_token_id: int) -> tuple[Tensor, Tensor | None]:
    """Returns ``(embeds [B, T, D], is_image [B, T] or None)``; ``image_embeds [N, P, D]`` or None.

    Without images the text passes through untouched (a decode step never holds an image).
    """
    if image_embeds is None:
        return text_embeds, None
    is_image = input_ids == image_token_id
    return splice_rows(text_embeds, is_image, image_embeds), is_image


class SpliceFusion(nn.Module):
    """``(text [B, T, D], images [N, P, D]) -> FusedInputs`` with images in the token stream."""

    #: The decoder's self-attention sees the image tokens (part contract, minivlm.registry).
    images_in_text_stream = True

    @classmethod
    def check_config(cls, config: VLMConfig) -> None:
        """Nothing beyond the generic checks: any image token count splices in."""

    @classmethod
    def placeholders_per_image(cls, config: VLMConfig, image_tokens: int) -> int:
        """One placeholder per image token: the image tokens replace them."""
        return image_tokens

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.image_token_id = config.image_token_id

    def forward(self, text_embeds: Tensor, image_embeds: Tensor | None, input_ids: Tensor, mask: AttentionMask,
                cache=None) -> FusedInputs:
        embeds, _ = splice(text_embeds, image_embeds, input_ids, self.image_token_id)
        return FusedInputs(embeds, mask)
