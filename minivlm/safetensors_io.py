"""Safe tensor-file reading: safetensors, or ``torch.load(weights_only=True)``; nothing else is unpickled."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


class WeightsFileError(ValueError):
    """A weights file is missing, corrupt, truncated or of a refused format."""


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """All tensors of a ``.safetensors`` file, with a clear error for missing/corrupt/truncated files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise WeightsFileError(f"weights file not found: {p}")
    try:
        return load_file(str(p), device=device)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        size = p.stat().st_size
        raise WeightsFileError(f"{p} ({size} bytes) is not a readable safetensors file "
                               f"(corrupt or truncated?): {err}") from err


def load_weights(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """Load a state dict from ``.safetensors``, or ``.bin``/``.pt``/``.pth`` via ``weights_only=True``."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return load_safetensors(p, device)
    if p.suffix not in (".bin", ".pt", ".pth"):
        raise WeightsFileError(f"{p}: expected a .safetensors, .bin, .pt or .pth file")
    if not p.is_file():
        raise WeightsFileError(f"weights file not found: {p}")
    try:
        obj = torch.load(p, map_location=device, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise WeightsFileError(f"{p} could not be read with torch.load(weights_only=True) "
                               f"(corrupt, truncated, or it contains pickled code): {err}") from err
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsFileError(f"{p} does not hold a flat {{name: tensor}} state dict")
    return obj
