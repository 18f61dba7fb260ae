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


class LayerNorm(nn.LayerNorm):
    """Layer norm (Ba et al. 2016) that normalises in fp32 when its input is bf16 or fp16.

    ``nn.LayerNorm`` itself (same parameters, same state-dict keys, still an ``nn.LayerNorm``), with
    one change: a half-precision input, as bf16 autocast on the CPU hands it over (autocast keeps
    CUDA layer norms in fp32, not CPU ones), is normalised in fp32 and the result cast back.
    PyTorch's CPU kernel accumulates the weight and bias gradients of a bf16 input at low
    precision: on the ``tiny`` encoder under bf16 autocast they were 6-22% off an fp32 reference
    (relative L2) where the median of the model's other gradients was 1.6% off; normalised in fp32
    they are 1.5-2.1% off (``python -m benchmarks.cpu_speed``; ``tests/layers/test_norms.py``).
    fp32 inputs take PyTorch's kernel unchanged.
    Shape: ``[..., D] -> [..., D]``, in the input's dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)
