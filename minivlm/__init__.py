"""minivlm: a from-scratch, modular Vision-Language Model library.

Four parts behind a LLaVA-style interface: image encoder -> embedding projector ->
multimodal fusion -> causal text decoder. See ``minivlm.model.VisionLanguageModel``.

The configs import nothing heavy; the model (and with it torch) is imported on first use of
``minivlm.VisionLanguageModel`` (PEP 562), so ``minivlm --help`` and config tools start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from minivlm.config import (DataConfig, DecoderConfig, EncoderConfig, FusionConfig, ProjectorConfig,
                            TrainConfig, VLMConfig, preset)

__version__ = "0.1.0"

#: Names served lazily: attribute -> module that defines it.
_LAZY = {"VisionLanguageModel": "minivlm.model", "VLMOutput": "minivlm.model", "build": "minivlm.builder"}

__all__ = [
    "VLMConfig", "EncoderConfig", "ProjectorConfig", "FusionConfig", "DecoderConfig", "TrainConfig", "DataConfig",
    "preset", "VisionLanguageModel", "VLMOutput", "build", "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'minivlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
