"""Linear projector: one matrix from image-feature width to text width (LLaVA v1, Liu et al. 2023)."""

from __future__ import annotations

from torch import Tensor, nn

from minivlm.config import VLMConfig
from minivlm.projectors.base import TokenPerPatch


class LinearProjector(TokenPerPatch, nn.Module):
    """``[N, P, D_img] -> [N, P, D_txt]``."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.proj = nn.Linear(config.encoder.width, config.decoder.width, bias=config.projector.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.proj(features)
