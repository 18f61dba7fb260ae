"""The sample format every minivlm dataset yields, and its validation.

A **sample** is a plain ``dict`` in the Hugging Face chat format (the layout of
``processor.apply_chat_template`` inputs in ``transformers``)::

    {
        "messages": [
            {"role": "user", "content": [
                {"type": "image", "image": <PIL.Image RGB>},
                {"type": "text", "text": "What shape is in the image?"},
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
        ],
        "task": "easy_vqa",          # which dataset produced it
        "answer": "circle",          # text of the last assistant turn (used by VQA accuracy)
        "question_type": "shape",    # optional: per-type accuracy breakdown
        "id": "easy_vqa/train/123",  # stable, unique within the dataset
    }

An optional ``system`` message may come first. Videos are ``{"type": "video", "video": [frames]}``
with a list of PIL frames (or, from data files, the path of a video file or frame folder that the
processor samples). The conversation format itself (roles, items, LLaVA placeholders, what is
valid) is owned by :mod:`minivlm.text.chat`; :func:`checked_messages` applies it to records. Datasets may add task-specific keys (``"scene"``, ``"caption"``,
``"image"``); consumers must ignore keys they do not know.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from PIL import Image

from minivlm.text.chat import (ChatFormatError, Message, from_llava, normalize_messages, to_hf_messages,
                               validate_conversation)


class DataError(ValueError):
    """A dataset record is unusable; the message starts with the file and line it came from.

    Attributes:
        detail: the message without its location.
        reason: short machine-readable category (``"bad_json"``, ``"unknown_role"``, ...), the key
            under which lenient datasets count skipped records.
        source: ``"path/to/file.jsonl:12"`` or similar; empty when the record has no location.
    """

    def __init__(self, detail: str, reason: str = "invalid_record", source: str = "") -> None:
        self.detail = detail
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {detail}" if source else detail)

    def __reduce__(self) -> tuple[type[DataError], tuple[str, str, str]]:
        # Keeps reason and source when the error crosses a process boundary (DataLoader workers).
        return type(self), (self.detail, self.reason, self.source)


def text_item(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def image_item(image: Image.Image) -> dict[str, Any]:
    return {"type": "image", "image": image}


def video_item(frames: Sequence[Image.Image]) -> dict[str, Any]:
    return {"type": "video", "video": list(frames)}


def vqa_sample(
    *,
    visuals: Iterable[dict[str, Any]],
    question: str,
    answer: str,
    task: str,
    sample_id: str,
    question_type: str | None = None,
    system: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build a one-turn sample: the user turn shows ``visuals`` then asks ``question``.

    Args:
        visuals: content items (:func:`image_item`, :func:`video_item`) placed before the
            question, in order; images first is the LLaVA convention.
        question, answer: user question and assistant answer (plain text).
        task, sample_id, question_type: metadata copied into the sample.
        system: optional system prompt, added as a first ``system`` message.
        extra: task-specific keys added to the sample (e.g. ``scene``).
    """
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": [text_item(system)]})
    messages.append({"role": "user", "content": [*visuals, text_item(question)]})
    messages.append({"role": "assistant", "content": [text_item(answer)]})
    sample: dict[str, Any] = {"messages": messages, "task": task, "answer": answer, "id": sample_id}
    if question_type is not None:
        sample["question_type"] = question_type
    sample.update(extra)
    return sample


def last_assistant_text(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """Concatenated text of the last assistant message, or None when there is none."""
    for message in reversed(messages):
        if message.get("role") == "assistant":
            return "".join(
                item["text"] for item in message["content"] if item.get("type") == "text"
            )
    return None


def checked_messages(messages: Any, *, require_assistant: bool, source: str = "") -> list[Message]:
    """Validate a record's Hugging Face chat ``messages`` with the conversation layer
    (:func:`minivlm.text.chat.normalize_messages`): the rules the processor renders by, plus a
    user turn, no blank turns and (``require_assistant``) an answer, as training data needs.

    Raises:
        DataError: with the :class:`~minivlm.text.chat.ChatFormatError`'s ``reason``
            (``bad_format``, ``unknown_role``, ``unknown_content_type``, ``empty_content``,
            ``media_not_allowed``, ``no_user_turn``, ``no_assistant_turn``, ...) and ``source``.
    """
    with _as_data_error(source):
        normalized = normalize_messages(messages, blank_is_empty=True)
        validate_conversation(normalized, for_training=require_assistant, require_user=True)
    return normalized


def checked_llava(conversations: Any, images: list[Any], videos: list[Any] = (), *, require_assistant: bool,
                  source: str = "") -> list[Message]:
    """:func:`checked_messages` for LLaVA ``conversations`` (:func:`minivlm.text.chat.from_llava`);
    a placeholder count that disagrees with the media is ``image_count_mismatch``."""
    with _as_data_error(source):
        normalized = from_llava(conversations, images, videos, blank_is_empty=True)
        validate_conversation(normalized, for_training=require_assistant, require_user=True)
    return normalized


#: The captioning prompt of converted caption data (COCO, webdataset ``txt``, parquet ``caption``),
#: the one :mod:`minivlm.data.shapes` asks.
CAPTION_PROMPT = "Describe the image."


def caption_messages(image: Any, caption: str, require_assistant: bool = True, source: str = "") -> list[Message]:
    """A checked captioning conversation: ``image`` and :data:`CAPTION_PROMPT`, answered by ``caption``."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": CAPTION_PROMPT}]},
                {"role": "assistant", "content": caption}]
    return checked_messages(messages, require_assistant=require_assistant, source=source)


def sample_from_messages(messages: list[Message], **metadata: Any) -> dict[str, Any]:
    """A sample dict (module docstring) of decoded ``messages``, with its ``answer``."""
    hf_messages = to_hf_messages(messages)
    sample: dict[str, Any] = {"messages": hf_messages, **metadata}
    answer = last_assistant_text(hf_messages)
    if answer is not None:
        sample["answer"] = answer
    return sample


@contextmanager
def _as_data_error(source: str) -> Iterator[None]:
    try:
        yield
    except ChatFormatError as error:
        raise DataError(str(error), reason=error.reason, source=source) from error
