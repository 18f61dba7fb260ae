"""What every fusion returns, and the placeholder bookkeeping they share.

Nothing here reads a tensor's values on the host: a fusion's forward runs without device syncs
and compiles as one graph. Whether the placeholders match the images is checked where data
enters (:meth:`minivlm.model.VisionLanguageModel.check_inputs`, with :func:`check_placeholders`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from minivlm.kernels.mask import AttentionMask

#: Called before decoder layer ``i`` as ``hidden = hook(i, hidden)``; how cross-attention fuses.
LayerHook = Callable[[int, Tensor], Tensor]


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


def check_placeholders(input_ids: Tensor, image_token_id: int, n_images: int, per_image: int) -> None:
    """Raise ValueError unless ``input_ids`` hold ``n_images * per_image`` placeholders (a host sync:
    for data entry and debugging, not for the forward)."""
    found = int((input_ids == image_token_id).sum())
    expected = n_images * per_image
    if found != expected:
        if n_images == 0:
            raise ValueError(f"input_ids contain {found} image placeholder tokens (id {image_token_id}) but no images "
                             f"were given; pass pixel_values or remove the placeholders")
        raise ValueError(f"expected {n_images} images x {per_image} tokens = {expected} image placeholder tokens "
                         f"(id {image_token_id}) in input_ids, found {found}")


def splice_rows(text_embeds: Tensor, is_image: Tensor, image_embeds: Tensor) -> Tensor:
    """``text_embeds [B, T, D]`` with the placeholder positions (``is_image [B, T]``) filled, in
    row-major order, by the rows of ``image_embeds [N, P, D]``; differentiable in both inputs.

    A gather by the running placeholder count rather than ``masked_scatter``: every shape is
    static, so it compiles into the surrounding graph.
    """
    flat = image_embeds.reshape(-1, image_embeds.shape[-1]).to(text_embeds.dtype)  # [N * P, D]
    index = (torch.cumsum(is_image.flatten().long(), 0) - 1).clamp(0, max(flat.shape[0] - 1, 0))
    gathered = flat.index_select(0, index).view_as(text_embeds)
    return torch.where(is_image[..., None], gathered, text_embeds)


def image_index(is_image: Tensor, tokens_per_image: int) -> Tensor:
    """``[B, T]`` long: which image (row-major count) each placeholder belongs to; -1 elsewhere."""
    flat = is_image.flatten().long()
    idx = (torch.cumsum(flat, 0) - 1) // tokens_per_image
    return torch.where(is_image, idx.view_as(is_image), torch.full_like(idx.view_as(is_image), -1))
