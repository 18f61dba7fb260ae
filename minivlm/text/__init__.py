"""Text side of minivlm: tokenizer, chat template with loss masks, and the multimodal processor.

* :mod:`minivlm.text.tokenizer`: :class:`Tokenizer`, sentencepiece with special tokens that
  text can never produce.
* :mod:`minivlm.text.chat`: HF and LLaVA conversation formats, the ChatML template, labels.
* :mod:`minivlm.text.processor`: :class:`Processor`, conversations to ``input_ids``, ``labels``
  and ``pixel_values`` whose placeholders line up with the images.
"""

from __future__ import annotations

from minivlm.text.chat import (
    IGNORE_INDEX,
    ChatFormatError,
    EmptyContentError,
    ImagePart,
    MediaNotAllowedError,
    Message,
    MissingAssistantTurnError,
    MissingMediaError,
    TextPart,
    UnknownContentTypeError,
    UnknownRoleError,
    VideoPart,
    from_llava,
    normalize_messages,
)
from minivlm.text.processor import (
    Processor,
    ProcessorConfig,
    RenderedSample,
    SampleSkipped,
    SequenceTooLongError,
)
from minivlm.text.tokenizer import (
    GLOBAL_IMAGE_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    VIDEO_TOKEN,
    Tokenizer,
    tile_token,
    tile_tokens,
)

__all__ = [
    "GLOBAL_IMAGE_TOKEN",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "PAD_TOKEN",
    "VIDEO_TOKEN",
    "ChatFormatError",
    "EmptyContentError",
    "ImagePart",
    "MediaNotAllowedError",
    "Message",
    "MissingAssistantTurnError",
    "MissingMediaError",
    "Processor",
    "ProcessorConfig",
    "RenderedSample",
    "SampleSkipped",
    "SequenceTooLongError",
    "TextPart",
    "Tokenizer",
    "UnknownContentTypeError",
    "UnknownRoleError",
    "VideoPart",
    "from_llava",
    "normalize_messages",
    "tile_token",
    "tile_tokens",
]
