"""Text side of minivlm: tokenizer, chat template with loss masks, and the multimodal processor.

* :mod:`minivlm.text.tokenizer_base`: :class:`TextTokenizer`, the interface of both tokenizer
  kinds, and :func:`load_tokenizer`.
* :mod:`minivlm.text.tokenizer`: :class:`Tokenizer`, sentencepiece with special tokens that
  text can never produce; :mod:`minivlm.text.hf_tokenizer`: :class:`HFTokenizer`, a
  ``tokenizer.json`` (Hugging Face ``tokenizers``) with its ids kept.
* :mod:`minivlm.text.templates`: chat templates per model family (ChatML, Idefics3/SmolVLM,
  LLaVA-1.5, nanoVLM), saved with a checkpoint as data.
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
from minivlm.text.hf_tokenizer import HFTokenizer
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
from minivlm.text.tokenizer_base import TextTokenizer, load_tokenizer

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
    "HFTokenizer",
    "TextTokenizer",
    "Tokenizer",
    "UnknownContentTypeError",
    "UnknownRoleError",
    "VideoPart",
    "from_llava",
    "load_tokenizer",
    "normalize_messages",
    "tile_token",
    "tile_tokens",
]
