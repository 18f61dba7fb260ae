"""nanoVLM (huggingface/nanoVLM ``data/processors.py``, ``data/datasets.py``): ChatML whose image
placeholders are written into the user's text.

One image of ``rows x cols`` tiles (``get_image_string``)::

    <|global_image|><|image|>*N<row_1_col_1><|image|>*N<row_1_col_2><|image|>*N...

(only the global part for a single-tile image), preceded by ``<image: k>`` (k from 0) when the
conversation holds several images. nanoVLM puts all images at the start of the first user message;
minivlm writes each where the message has it, which is the same for that layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from minivlm.text.segments import Segment, SpecialSegment, TextSegment
from minivlm.text.templates.base import TEMPLATES, view_order
from minivlm.text.templates.chatml import ChatMLTemplate
from minivlm.text.tokenizer_base import tile_token

NANOVLM_IMAGE_TOKEN = "<|image|>"
NANOVLM_GLOBAL_IMAGE_TOKEN = "<|global_image|>"


@TEMPLATES.register("nanovlm")
@dataclasses.dataclass
class NanoVLMTemplate(ChatMLTemplate):
    kind = "nanovlm"
    image_token = NANOVLM_IMAGE_TOKEN
    # nanoVLM's VLMConfig.lm_chat_template (content is a string there: the image string is text).
    jinja = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
             "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

    def image_layout(self, processed: Any, image_seq_len: int, index: int, count: int) -> tuple[list[Segment], Tensor]:
        image = SpecialSegment(NANOVLM_IMAGE_TOKEN, repeat=image_seq_len)
        segments: list[Segment] = [TextSegment(f"<image: {index}>")] if count > 1 else []
        segments += [SpecialSegment(NANOVLM_GLOBAL_IMAGE_TOKEN), image]
        for row in range(1, processed.rows + 1):
            for col in range(1, processed.cols + 1):
                segments += [SpecialSegment(tile_token(row, col)), image]
        return segments, view_order(processed, global_first=True)

    def video_layout(self, frames: Sequence[tuple[float, Tensor]], duration: float,
                     image_seq_len: int) -> list[tuple[list[Segment], Tensor | None]]:
        raise ValueError("nanoVLM has no video format")

    def required_tokens(self) -> list[str]:
        return super().required_tokens() + [NANOVLM_GLOBAL_IMAGE_TOKEN]
