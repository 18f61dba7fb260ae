"""Mixed precision: bf16 autocast, fp16 autocast with a gradient scaler, or fp32.

Weights (and so optimizer state) stay fp32 in every mode: autocast casts per op, which is the
"fp32 master weights" recipe (Micikevicius et al. 2018) without a second copy.
"""

from __future__ import annotations

import contextlib

import torch


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA cards that support it, else fp32 (CPU autocast gains little here).

    fp16 and bf16 autocast both run on the CPU (torch >= 2.4), useful to test those paths
    without a GPU; a CUDA card without bf16 (pre-Ampere) is refused bf16 by name.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision: expected one of {' | '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                         f"use fp16 (with its gradient scaler) or fp32")
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(precision: str, device: torch.device):
    """The autocast context of a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Enabled only for fp16, whose narrow exponent range underflows small gradients."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
