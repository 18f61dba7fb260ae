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
with a list of PIL frames. Datasets may add task-specific keys (``"scene"``, ``"caption"``,
``"image"``); consumers must ignore keys they do not know.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from PIL import Image

ROLES = ("system", "user", "assistant")
CONTENT_TYPES = ("text", "image", "video")


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


def normalise_messages(
    messages: Any, *, require_assistant: bool, source: str = ""
) -> list[dict[str, Any]]:
    """Check a decoded chat ``messages`` list and return it with every content as a list of items.

    A string ``content`` (allowed by the HF chat format) becomes ``[{"type": "text", ...}]``.
    Media items are kept as they are (their ``image`` / ``video`` values are left for the caller
    to resolve), but must carry a value.

    Raises:
        DataError: with ``reason`` one of ``bad_format`` (not a list of message dicts, an item
            that is not a dict or lacks its value), ``unknown_role``, ``unknown_content_type``,
            ``empty_content`` (no items, or only blank text), ``no_assistant_turn``.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"'messages' must be a non-empty list, got {_describe(messages)}",
            reason="bad_format",
            source=source,
        )
    normalised = []
    for position, message in enumerate(messages):
        where = f"message {position}"
        if not isinstance(message, dict):
            raise DataError(
                f"{where} must be a dict, got {_describe(message)}",
                reason="bad_format",
                source=source,
            )
        role = message.get("role")
        if role not in ROLES:
            raise DataError(
                f"{where} has role {role!r}; expected one of {ROLES}",
                reason="unknown_role",
                source=source,
            )
        content = message.get("content")
        if isinstance(content, str):
            content = [text_item(content)]
        if not isinstance(content, list):
            raise DataError(
                f"{where} ({role}) content must be a string or a list of items, got "
                f"{_describe(content)}",
                reason="bad_format",
                source=source,
            )
        items = [_check_item(item, f"{where} ({role})", source) for item in content]
        if not any(item["type"] != "text" or item["text"].strip() for item in items):
            raise DataError(
                f"{where} ({role}) has empty content", reason="empty_content", source=source
            )
        normalised.append({**message, "content": items})
    if require_assistant and not any(m["role"] == "assistant" for m in normalised):
        raise DataError(
            "a training sample needs at least one assistant message, found roles "
            f"{[m['role'] for m in normalised]}",
            reason="no_assistant_turn",
            source=source,
        )
    return normalised


def _check_item(item: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise DataError(
            f"{where}: content item must be a dict, got {_describe(item)}",
            reason="bad_format",
            source=source,
        )
    kind = item.get("type")
    if kind not in CONTENT_TYPES:
        raise DataError(
            f"{where}: content item type {kind!r}; expected one of {CONTENT_TYPES}",
            reason="unknown_content_type",
            source=source,
        )
    if kind == "text" and not isinstance(item.get("text"), str):
        raise DataError(
            f"{where}: text item needs a string 'text', got {_describe(item.get('text'))}",
            reason="bad_format",
            source=source,
        )
    if kind != "text" and item.get(kind) in (None, "", []):
        raise DataError(
            f"{where}: {kind} item has no {kind!r} value", reason="bad_format", source=source
        )
    return item


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
