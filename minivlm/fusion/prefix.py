"""Bidirectional image prefix: splice, plus full attention among the tokens of one image.

A prefix-LM mask (Raffel et al. 2020 T5 "prefix LM"; PaliGemma, Beyer et al. 2024, attends
bidirectionally over its image+prefix): image patches are a set, not a sequence, so causal
masking inside an image hides half of it from its own first tokens for no reason. Text stays
causal and still sees every earlier image token.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from minivlm.fusion.base import FusedInputs, image_index
from minivlm.fusion.splice import SpliceFusion, splice
from minivlm.kernels.mask import AttentionMask


class PrefixFusion(SpliceFusion):
    """Splice + ``span_ids`` so each image's tokens see each other (see the mask family in kernels.mask)."""

    def forward(self, text_embeds: Tensor, image_embeds: Tensor | None, input_ids: Tensor, mask: AttentionMask,
                cache=None) -> FusedInputs:
        embeds, is_image = splice(text_embeds, image_embeds, input_ids, self.image_token_id)
        if is_image is None:
            return FusedInputs(embeds, mask)  # no image among these tokens: plain causal
        spans = image_index(is_image, image_embeds.shape[1]) + 1  # 0 = text, k+1 = image k
        if cache is not None:
            # Keys are the cache columns attention reads; the columns before these tokens carry no
            # new image, nor do the unwritten ones after them.
            spans = F.pad(spans, (mask.q_offset, cache.read_len - mask.q_offset - spans.shape[1]))
        return FusedInputs(embeds, replace(mask, span_ids=spans.to(torch.long)))
