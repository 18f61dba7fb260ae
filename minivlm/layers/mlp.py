"""Feed-forward blocks: the ViT MLP and the Llama SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivlm.layers.packed_linear import PackedWeight, packed_linear


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    """``gelu`` (exact erf), ``gelu_tanh`` (SigLIP, GPT-2), ``quick_gelu`` (OpenAI CLIP)."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}; expected gelu | gelu_tanh | quick_gelu")


class MLP(nn.Module):
    """Two-layer transformer MLP ``fc2(act(fc1(x)))``. Shape: ``[..., D] -> [..., D_out]``."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020), Llama layout: ``down(silu(gate(x)) * up(x))``."""

    packed_linears = (("gate", "up"), ("down",))  # see minivlm.layers.packed_linear

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.packed: tuple[PackedWeight, PackedWeight] | None = None  # set by PackedLinears while decoding

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``x [..., D] -> [..., D]``, plus ``residual`` (shaped like the output) if given."""
        packed = self.packed
        if packed is None or torch.is_grad_enabled():  # as in DecoderAttention: per-thread grad mode
            out = self.down(F.silu(self.gate(x)) * self.up(x))
            return out if residual is None else residual + out
        gate, up = packed_linear(x, packed[0]).chunk(2, dim=-1)  # decoding: one product (PackedLinears)
        return packed_linear(F.silu(gate) * up, packed[1], residual)
