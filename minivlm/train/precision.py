"""Mixed precision: bf16 autocast, fp16 autocast with a gradient scaler, or fp32.

Weights (and so optimizer state) stay fp32 in every mode: autocast casts per op, which is the
"fp32 master weights" recipe (Micikevicius et al. 2018) without a second copy.
"""

from __future__ import annotations

import contextlib

import torch


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (x86 AVX-512 BF16 or AMX): where it has not,
    PyTorch emulates bf16 products and autocast would slow training down instead of speeding it up."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch.cpu since 2.2
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the device multiplies bf16 natively, else fp32.

    CUDA: bf16 on cards that support it (Ampere and later). CPU: bf16 when it has AVX-512 BF16 or
    AMX (:func:`cpu_multiplies_bf16`): the ``tiny`` main job's step is ~0.8x as long under bf16
    autocast on such a CPU (``python -m benchmarks.cpu_speed``), attention kept in fp32
    (:func:`minivlm.kernels.reference.sdpa_attention`). The choice depends on what the hardware
    can do, never on how fast or busy it is; pin ``train.precision`` to compare machines bit for bit.

    fp16 and bf16 autocast both run on any CPU (torch >= 2.4), useful to test those paths
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
    if device.type == "cpu" and cpu_multiplies_bf16():
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
