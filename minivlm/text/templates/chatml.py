"""ChatML (Qwen, SmolLM2; minivlm's own models), the layout of :mod:`minivlm.text.chat`::

    <|im_start|>user\n{text and image tokens}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from minivlm.text.chat import chat_segments, image_segments, video_frame_segments
from minivlm.text.segments import Segment
from minivlm.text.templates.base import TEMPLATES, ChatTemplate, view_order
from minivlm.text.tokenizer_base import IM_END_TOKEN, IM_START_TOKEN


@TEMPLATES.register("chatml")
@dataclasses.dataclass
class ChatMLTemplate(ChatTemplate):
    """Images: tiles row by row (``<row_r_col_c>``, a newline per row), then ``<global-img>``;
    video frames: ``"mm:ss "`` then the frame's tokens."""

    kind = "chatml"
    end_of_turn = IM_END_TOKEN
    jinja = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
             "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
             "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
             "{% elif item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
             "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

    def segments(self, messages: Sequence[Any], *, add_generation_prompt: bool = False) -> list[Segment]:
        return chat_segments(messages, add_generation_prompt=add_generation_prompt)

    def image_layout(self, processed: Any, image_seq_len: int, index: int, count: int) -> tuple[list[Segment], Tensor]:
        return image_segments(image_seq_len, processed.rows, processed.cols), view_order(processed, global_first=False)

    def video_layout(self, frames: Sequence[tuple[float, Tensor]], duration: float,
                     image_seq_len: int) -> list[tuple[list[Segment], Tensor | None]]:
        return [(video_frame_segments(timestamp, image_seq_len), views) for timestamp, views in frames]

    def required_tokens(self) -> list[str]:
        return super().required_tokens() + [IM_START_TOKEN]
