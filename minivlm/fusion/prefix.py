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
from minivlm.layers.kv_cache import StaticKVCache
from minivlm.registry import FUSIONS


@FUSIONS.register("prefix")
class PrefixFusion(SpliceFusion):
    """Splice + ``span_ids`` so each image's tokens see each other (see the mask family in kernels.mask)."""

    def forward(self, text_embeds: Tensor, image_embeds: Tensor | None, input_ids: Tensor, mask: AttentionMask,
                cache: StaticKVCache | None = None) -> FusedInputs:
        embeds, is_image = splice(text_embeds, image_embeds, input_ids, self.image_token_id, self.tokens_per_image)
        if not bool(is_image.any()):
            return FusedInputs(embeds, mask)
        spans = image_index(is_image, self.tokens_per_image) + 1  # 0 = text, k+1 = image k
        if mask.q_offset:
            # Keys cover the cached prefix too; earlier positions carry no new image.
            spans = F.pad(spans, (mask.q_offset, 0))
        return FusedInputs(embeds, replace(mask, span_ids=spans.to(torch.long)))
