"""LLaVA-1.5 (Liu et al. 2023, "Improved Baselines"), as llava-hf's processors render it::

    USER: <image>\nWhat is this? ASSISTANT: A cat. USER: And that? ASSISTANT:

A message's images come first, each followed by ``"\n"``, then its texts, each followed by a
space; a system message is written without a role. The tokenizer's post-processor puts ``<s>``
in front. Supervised: the answer text (the span of llava-hf's ``{% generation %}`` block, its
trailing space aside, which the next token ``"▁USER"`` carries). The template closes an answer
with no token, so a model fine-tuned on it is not taught to stop; llava-1.5 was trained with
``</s>`` after each answer (LLaVA's ``vicuna_v1`` format) and stops at the eos.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from minivlm.text.segments import MediaSegment, Segment, SpecialSegment, TextSegment, merge_text_segments
from minivlm.text.templates.base import TEMPLATES, ChatTemplate, view_order
from minivlm.text.tokenizer_base import IMAGE_TOKEN


@TEMPLATES.register("llava")
@dataclasses.dataclass
class LlavaTemplate(ChatTemplate):
    kind = "llava"
    jinja = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
             "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
             "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
             "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
             "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
             "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

    def segments(self, messages: Sequence[Any], *, add_generation_prompt: bool = False) -> list[Segment]:
        from minivlm.text.chat import TextPart

        segments: list[Segment] = []
        for message in messages:
            supervised = message.role == "assistant"
            if message.role != "system":
                segments.append(TextSegment(message.role.upper() + ": "))
            for part in message.parts:
                if not isinstance(part, TextPart):
                    segments += [MediaSegment(part), TextSegment("\n")]
            for part in message.parts:
                if isinstance(part, TextPart):
                    segments += [TextSegment(part.text, supervised), TextSegment(" ")]
        if add_generation_prompt:
            segments.append(TextSegment("ASSISTANT:"))
        return merge_text_segments(segments)

    def image_layout(self, processed: Any, image_seq_len: int, index: int, count: int) -> tuple[list[Segment], Tensor]:
        if processed.rows:
            raise ValueError("the LLaVA-1.5 layout has one view per image; the image processor split it into tiles")
        return [SpecialSegment(IMAGE_TOKEN, repeat=image_seq_len)], view_order(processed, False)

    def video_layout(self, frames: Sequence[tuple[float, Tensor]], duration: float,
                     image_seq_len: int) -> list[tuple[list[Segment], Tensor | None]]:
        raise ValueError("LLaVA-1.5 has no video format")
