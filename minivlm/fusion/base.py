"""What every fusion returns, and the placeholder bookkeeping they share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from minivlm.decoders.llama import LayerHook
from minivlm.kernels.mask import AttentionMask


@dataclass
class FusedInputs:
    """Decoder inputs after fusion.

    embeds: ``[B, T, D]`` input embeddings (image tokens spliced in, or text only).
    mask: the attention mask description for the decoder's self-attention.
    layer_hook: called before each decoder layer (cross-attention fusion), or None.
    """

    embeds: Tensor
    mask: AttentionMask
    layer_hook: LayerHook | None = None


def placeholder_mask(input_ids: Tensor, image_token_id: int, n_images: int, tokens_per_image: int) -> Tensor:
    """``[B, T]`` bool of placeholder positions, after checking they match the images given.

    Images are matched to placeholders in row-major order: image ``j`` fills placeholder run ``j``.
    """
    is_image = input_ids == image_token_id
    found = int(is_image.sum())
    expected = n_images * tokens_per_image
    if found != expected:
        if n_images == 0:
            raise ValueError(f"input_ids contain {found} image placeholder tokens (id {image_token_id}) but no images "
                             f"were given; pass pixel_values or remove the placeholders")
        raise ValueError(f"expected {n_images} images x {tokens_per_image} tokens = {expected} image placeholder tokens "
                         f"(id {image_token_id}) in input_ids, found {found}")
    return is_image


def image_index(is_image: Tensor, tokens_per_image: int) -> Tensor:
    """``[B, T]`` long: which image (row-major count) each placeholder belongs to; -1 elsewhere."""
    flat = is_image.flatten().long()
    idx = (torch.cumsum(flat, 0) - 1) // tokens_per_image
    return torch.where(is_image, idx.view_as(is_image), torch.full_like(idx.view_as(is_image), -1))
