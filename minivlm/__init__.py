"""minivlm: a from-scratch, modular Vision-Language Model library.

Four parts behind a LLaVA-style interface: image encoder -> embedding projector ->
multimodal fusion -> causal text decoder. See ``minivlm.model.VisionLanguageModel``.
"""

from minivlm.config import (DataConfig, DecoderConfig, EncoderConfig, FusionConfig, ProjectorConfig,
                            TrainConfig, VLMConfig, preset)
from minivlm.model import VisionLanguageModel, VLMOutput

__version__ = "0.1.0"

__all__ = [
    "VLMConfig", "EncoderConfig", "ProjectorConfig", "FusionConfig", "DecoderConfig", "TrainConfig", "DataConfig",
    "preset", "VisionLanguageModel", "VLMOutput", "__version__",
]
