"""MLP projector: LLaVA-1.5's ``mlp2x_gelu`` (Liu et al. 2023, "Improved Baselines"), depth configurable."""

from __future__ import annotations

from torch import Tensor, nn

from minivlm.config import VLMConfig
from minivlm.projectors.base import TokenPerPatch


def gelu_mlp(in_dim: int, hidden: int, out_dim: int, depth: int, bias: bool = True) -> nn.Sequential:
    """``depth`` Linear layers with GELU between them; depth 1 is a single Linear.

    Indexing follows LLaVA's ``nn.Sequential`` (Linear at 0, 2, 4, ...), so its checkpoints load
    with the same keys.
    """
    dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(depth):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
    return nn.Sequential(*layers)


class MLPProjector(TokenPerPatch, nn.Module):
    """``[N, P, D_img] -> [N, P, D_txt]`` through ``depth`` GELU-separated Linear layers."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        p = config.projector
        out = config.decoder.width
        self.mlp = gelu_mlp(config.encoder.width, p.hidden_dim or out, out, p.depth, p.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.mlp(features)
