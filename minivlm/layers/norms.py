"""Normalisation layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), as in Llama: ``x / rms(x) * weight``.

    Computed in fp32 and cast back, matching the Hugging Face Llama reference bit for bit in fp32.
    Shape: ``[..., D] -> [..., D]``.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype, weight = x.dtype, self.weight  # one module attribute lookup: decoding runs 2 norms per layer per token
        if dtype == torch.float32 and weight.dtype == torch.float32:
            # PyTorch's rms_norm computes the same fp32 expression (bit for bit) in fewer calls.
            return F.rms_norm(x, weight.shape, weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
