"""Idefics3 / SmolVLM / SmolVLM2 (Laurençon et al. 2024; transformers ``Idefics3Processor`` and
``SmolVLMProcessor``): the chat template and the image and video prompt layouts.

Rendered (what ``apply_chat_template`` gives with the template below, before the processor
expands ``<image>``)::

    <|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant: A cat.<end_of_utterance>\nAssistant:

A role is followed by ``":"`` when its first content item is an image, else ``": "``. The answer
and its ``<end_of_utterance>`` are supervised (the model learns to answer and to stop).

An image becomes ``<fake_token_around_image><global-img><image>*N<fake_token_around_image>``
unsplit, and split into ``rows x cols`` tiles (``_prompt_split_image``)::

    <fake_token_around_image><row_1_col_1><image>*N<fake_token_around_image><row_1_col_2><image>*N\n
    ...
    \n<fake_token_around_image><global-img><image>*N<fake_token_around_image>

A video (SmolVLM2, ``SmolVLMProcessor.replace_video_token``) is an introduction naming the frame
count in words and the duration as ``H:MM:SS``, then per frame ``"\nFrame from mm:ss:"`` and
the frame as an unsplit image, then ``"\n\n"``.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from minivlm.text.segments import MediaSegment, Segment, SpecialSegment, TextSegment, merge_text_segments
from minivlm.text.templates.base import TEMPLATES, ChatTemplate, view_order
from minivlm.text.tokenizer_base import GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, IM_START_TOKEN, tile_token

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
END_OF_UTTERANCE = "<end_of_utterance>"
VIDEO_INTRO = "You are provided the following series of {count} frames from a {duration} [H:MM:SS] video.\n"
FRAME_MESSAGE = "\nFrame from {minutes:02d}:{seconds:02d}:"
MEDIA_OUTRO = "\n\n"

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words of ``0 <= n < 10**6``, spelled as ``num2words(n)`` spells them (SmolVLM2
    writes the frame count this way): 21 -> "twenty-one", 105 -> "one hundred and five"."""
    if not 0 <= n < 10**6:
        raise ValueError(f"number_words covers 0 .. 999999; got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    rest = n % 1000
    head = number_words(n // 1000) + " thousand"
    if rest == 0:
        return head
    return head + (" and " if rest < 100 else ", ") + number_words(rest)


@TEMPLATES.register("idefics3")
@dataclasses.dataclass
class Idefics3Template(ChatTemplate):
    kind = "idefics3"
    end_of_turn = END_OF_UTTERANCE
    # transformers' SmolVLMProcessor DEFAULT_CHAT_TEMPLATE (SmolVLM / SmolVLM2 ship the same format).
    jinja = ("<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
             "{% if message['content'] is string %}{{': ' + message['content']}}{% else %}"
             "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
             "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
             "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}"
             "{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
             "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

    def segments(self, messages: Sequence[Any], *, add_generation_prompt: bool = False) -> list[Segment]:
        from minivlm.text.chat import ImagePart, TextPart

        segments: list[Segment] = [SpecialSegment(IM_START_TOKEN)]
        for message in messages:
            supervised = message.role == "assistant"
            colon = ":" if isinstance(message.parts[0], ImagePart) else ": "
            segments.append(TextSegment(message.role.capitalize() + colon))
            for part in message.parts:
                segments.append(TextSegment(part.text, supervised) if isinstance(part, TextPart) else MediaSegment(part))
            segments += [SpecialSegment(END_OF_UTTERANCE, supervised), TextSegment("\n")]
        if add_generation_prompt:
            segments.append(TextSegment("Assistant:"))
        return merge_text_segments(segments)

    def image_layout(self, processed: Any, image_seq_len: int, index: int, count: int) -> tuple[list[Segment], Tensor]:
        return self._image_segments(processed.rows, processed.cols, image_seq_len), view_order(processed, False)

    @staticmethod
    def _image_segments(rows: int, cols: int, image_seq_len: int) -> list[Segment]:
        image = SpecialSegment(IMAGE_TOKEN, repeat=image_seq_len)
        fake = SpecialSegment(FAKE_IMAGE_TOKEN)
        segments: list[Segment] = []
        for row in range(1, rows + 1):
            for col in range(1, cols + 1):
                segments += [fake, SpecialSegment(tile_token(row, col)), image]
            segments.append(TextSegment("\n"))
        if rows:
            segments.append(TextSegment("\n"))
        segments += [fake, SpecialSegment(GLOBAL_IMAGE_TOKEN), image, fake]
        return merge_text_segments(segments)

    def video_layout(self, frames: Sequence[tuple[float, Tensor]], duration: float,
                     image_seq_len: int) -> list[tuple[list[Segment], Tensor | None]]:
        intro = VIDEO_INTRO.format(count=number_words(len(frames)),
                                   duration=datetime.timedelta(seconds=int(duration)))
        chunks: list[tuple[list[Segment], Tensor | None]] = [([TextSegment(intro)], None)]
        for timestamp, views in frames:
            stamp = FRAME_MESSAGE.format(minutes=int(timestamp // 60), seconds=int(timestamp % 60))
            chunks.append(([TextSegment(stamp)] + self._image_segments(0, 0, image_seq_len), views))
        chunks.append(([TextSegment(MEDIA_OUTRO)], None))
        return chunks

    def required_tokens(self) -> list[str]:
        return super().required_tokens() + [IM_START_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN]
