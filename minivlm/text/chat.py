"""Conversations: input formats, the chat template, and which tokens are supervised.

**Inputs.** Two dataset formats are normalised to one representation (:class:`Message` holding
:class:`TextPart`, :class:`ImagePart` and :class:`VideoPart`):

* the Hugging Face chat structure (:func:`normalize_messages`)::

      [{"role": "system" | "user" | "assistant",
        "content": "text" | [{"type": "text", "text": "..."},
                             {"type": "image", "image": path | PIL | array | bytes},
                             {"type": "video", "video": path | [frames], "fps": 2.0}]}]

  Images may also be given under ``"url"`` or ``"path"`` (local files only, as HF allows).
  ``"<image>"`` written inside a text item is ordinary text, never a placeholder.
* LLaVA conversation JSON (:func:`from_llava`): ``[{"from": "human" | "gpt" | "system",
  "value": "<image>\\nWhat is ..."}]`` with the images passed separately, consumed in order by
  the ``<image>`` (and ``<video>``) placeholders. A newline right next to a placeholder only
  separates it and is dropped, so ``"<image>\\nWhat"`` equals the HF content
  ``[image, {"text": "What"}]`` and LLaVA files mix with HF-format datasets (the same rule as
  Hugging Face chat dicts).

This module is the one owner of the conversation format: the processor renders what it
returns, and the data files (:mod:`minivlm.data.jsonl`, :mod:`minivlm.data.llava`, the shard
sources) validate their records with it, turning a :class:`ChatFormatError` into a counted
skip under the error's :attr:`~ChatFormatError.reason`. :func:`to_hf_messages` turns the
normalised messages back into the Hugging Face dicts that samples carry.

**Template** (ChatML, as in Qwen and SmolLM; content parts are concatenated with no separator)::

    <|im_start|>system\\n{system text}<|im_end|>\\n
    <|im_start|>user\\n{text and image tokens}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n
    ... and with add_generation_prompt=True: <|im_start|>assistant\\n

No default system prompt is inserted. An image is ``<image>`` repeated ``image_seq_len`` times;
a split image (SmolVLM/Idefics3 style) is, for each tile row, ``<row_r_col_c>`` + tokens per
tile then ``"\\n"``, followed by ``<global-img>`` + the global view's tokens
(:func:`image_segments`). A video is, per frame, ``"{mm:ss} "`` + the frame's image tokens
(:func:`video_frame_segments`).

**Labels.** Only the assistant's answer and its closing ``<|im_end|>`` are supervised: the model
learns to answer and to stop. The ``"\\n"`` after ``<|im_end|>`` is not supervised, since
generation stops at ``<|im_end|>`` and never emits it. The template is a list of
:class:`TextSegment` / :class:`SpecialSegment` carrying their own ``supervised`` flag; ids are
built segment by segment (:func:`encode_segments`), so the labels are exact by construction
instead of being recovered by re-tokenising the full string and searching for spans (the source
of LLaVA's "tokenization mismatch" warnings).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from minivlm.text.tokenizer import (
    GLOBAL_IMAGE_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    tile_token,
)
from minivlm.text.segments import (  # noqa: F401  (re-exported: these lived here before templates)
    IGNORE_INDEX,
    MediaSegment,
    Segment,
    SpecialSegment,
    TextSegment,
    encode_segments,
    merge_text_segments,
    segments_to_text,
)
from minivlm.vision import format_timestamp

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
#: LLaVA speaker names (and the plain role names some converted sets use) -> roles.
LLAVA_ROLES: dict[str, str] = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                               "assistant": "assistant"}
MEDIA_KEYS: tuple[str, ...] = ("url", "path")


# ---- errors -----------------------------------------------------------------------------------
class ChatFormatError(ValueError):
    """A conversation does not follow the expected structure.

    Attributes:
        reason: short category under which data files count a skipped record (``bad_format``,
            ``unknown_role``, ...); each subclass has its own, a raise may name a finer one.
    """

    reason = "bad_format"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # keeps the reason across DataLoader worker processes
        return type(self), (str(self), self.reason)


class UnknownRoleError(ChatFormatError):
    """A message role other than system/user/assistant (or human/gpt/system for LLaVA), or none."""

    reason = "unknown_role"


class EmptyContentError(ChatFormatError):
    """A message with no media and no text but whitespace."""

    reason = "empty_content"


class UnknownContentTypeError(ChatFormatError):
    """A content item whose ``type`` is not text/image/video."""

    reason = "unknown_content_type"


class MissingMediaError(ChatFormatError):
    """An image or video item that names no image/video, or LLaVA placeholders without media."""


class MediaNotAllowedError(ChatFormatError):
    """An image or video in a system or assistant message: the model reads images, it does not
    write them, and a supervised turn cannot contain unsupervised image placeholders."""

    reason = "media_not_allowed"


class MissingAssistantTurnError(ChatFormatError):
    """A training sample without an assistant answer would contribute no loss."""

    reason = "no_assistant_turn"


class MissingUserTurnError(ChatFormatError):
    """A conversation rendered without any user message: there is nothing to answer."""

    reason = "no_user_turn"


class TextEncodingError(ChatFormatError):
    """Text that is not valid Unicode, e.g. a Latin-1 byte read as UTF-8 with ``surrogateescape``
    (how Python decodes a command-line argument or stdin line that is not UTF-8)."""

    reason = "bad_encoding"


# ---- normalised representation --------------------------------------------------------------
@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """An image source, anything :func:`minivlm.vision.load_image` accepts (loaded lazily)."""

    image: Any


@dataclass(frozen=True)
class VideoPart:
    """A video source for :func:`minivlm.vision.load_video`; ``fps`` times untimed frame lists."""

    video: Any
    fps: float | None = None


Part = Union[TextPart, ImagePart, VideoPart]


@dataclass(frozen=True)
class Message:
    role: Role
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        """The message's text parts joined (media left out)."""
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))

    @property
    def media(self) -> tuple[ImagePart | VideoPart, ...]:
        return tuple(p for p in self.parts if not isinstance(p, TextPart))


# ---- input formats ----------------------------------------------------------------------------
def normalize_messages(messages: Sequence[Mapping[str, Any] | Message], *,
                       blank_is_empty: bool = False) -> list[Message]:
    """Hugging Face chat messages (or already normalised :class:`Message` objects) -> messages.

    ``blank_is_empty``: a message whose only text is whitespace counts as empty (training data:
    a blank answer teaches nothing); rendering keeps such text as written.

    Raises :class:`ChatFormatError` subclasses for malformed input; see
    :func:`validate_conversation` for the rules about roles and media.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatFormatError(f"'messages' must be a non-empty list of messages (a conversation); got "
                              f"{type(messages).__name__}")
    normalized = [m if isinstance(m, Message) else _normalize_hf_message(m, i, blank_is_empty)
                  for i, m in enumerate(messages)]
    validate_conversation(normalized)
    return normalized


def _normalize_hf_message(message: Any, index: int, blank_is_empty: bool = False) -> Message:
    where = f"message #{index}"
    if not isinstance(message, Mapping):
        raise ChatFormatError(f"{where} must be a dict with 'role' and 'content'; got {type(message).__name__}")
    if "role" not in message or "content" not in message:
        error = UnknownRoleError if "role" not in message else ChatFormatError
        raise error(f"{where} must have 'role' and 'content' keys; got keys {sorted(message)}")
    role = message["role"]
    if role not in ROLES:
        raise UnknownRoleError(f"{where} has role {role!r}; expected one of {ROLES}")
    content = message["content"]
    if isinstance(content, str):
        parts = [TextPart(content)] if content else []
    elif isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        parts = [_normalize_hf_item(item, f"{where} item #{j}") for j, item in enumerate(content)]
    else:
        raise ChatFormatError(f"{where} content must be a str or a list of items; got {type(content).__name__}")
    # Empty text items add nothing; a message made only of them is empty.
    parts = [p for p in parts if not (isinstance(p, TextPart) and not p.text)]
    if _is_empty(parts, blank_is_empty):
        raise EmptyContentError(f"{where} ({role}) has empty content")
    return Message(role=role, parts=tuple(parts))


def _is_empty(parts: Sequence[Part], blank_is_empty: bool) -> bool:
    """No media and no text (with ``blank_is_empty``: no text but whitespace)."""
    return not any(not isinstance(p, TextPart) or (p.text.strip() if blank_is_empty else p.text) for p in parts)


def _normalize_hf_item(item: Any, where: str) -> Part:
    if not isinstance(item, Mapping):
        raise ChatFormatError(f"{where} must be a dict with a 'type'; got {type(item).__name__}")
    item_type = item.get("type")
    if item_type == "text":
        text = item.get("text")
        if not isinstance(text, str):
            raise ChatFormatError(f"{where} is a text item whose 'text' is {type(text).__name__}, expected str")
        return TextPart(text)
    if item_type in ("image", "video"):
        source = next((item[k] for k in (item_type, *MEDIA_KEYS) if item.get(k) is not None), None)
        if source is None:
            raise MissingMediaError(
                f"{where} is a {item_type} item with no {item_type}; give it under one of the keys "
                f"{(item_type, *MEDIA_KEYS)}; got keys {sorted(item)}"
            )
        if item_type == "image":
            return ImagePart(source)
        return VideoPart(source, fps=_check_fps(item.get("fps"), where))
    raise UnknownContentTypeError(f"{where} has type {item_type!r}; expected 'text', 'image' or 'video'")


def _check_fps(fps: Any, where: str) -> float | None:
    if fps is None:
        return None
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ChatFormatError(f"{where} has fps={fps!r}; expected a positive number")
    return float(fps)


def from_llava(
    conversation: Sequence[Mapping[str, Any]],
    images: Sequence[Any] = (),
    videos: Sequence[Any] = (),
    *,
    blank_is_empty: bool = False,
) -> list[Message]:
    """LLaVA conversation JSON -> messages.

    Each ``<image>`` (``<video>``) in a ``value`` takes the next item of ``images``
    (``videos``), in order of appearance over the whole conversation; every given image must be
    used exactly once. A single path may be passed as ``images`` like LLaVA's ``"image"`` field.
    As in LLaVA's own loader, one image with no ``<image>`` anywhere goes before the first user
    text. One ``"\\n"`` directly before or after a placeholder is dropped (module docstring).
    ``blank_is_empty`` as in :func:`normalize_messages`.
    """
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if isinstance(videos, (str, os.PathLike)):
        videos = [videos]
    if isinstance(conversation, (str, bytes, Mapping)) or not isinstance(conversation, Sequence):
        raise ChatFormatError(f"a LLaVA conversation must be a list of turns; got {type(conversation).__name__}")
    turns = []
    for index, turn in enumerate(conversation):
        where = f"LLaVA turn #{index}"
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise ChatFormatError(f"{where} must be a dict with 'from' and 'value' keys; got {turn!r:.80}")
        speaker, value = turn["from"], turn["value"]
        if speaker not in LLAVA_ROLES:
            raise UnknownRoleError(f"{where} has 'from': {speaker!r}; expected one of {tuple(LLAVA_ROLES)}")
        if not isinstance(value, str):
            raise ChatFormatError(f"{where} has a {type(value).__name__} 'value', expected str")
        turns.append((LLAVA_ROLES[speaker], value, where))
    if len(images) == 1 and not any(IMAGE_TOKEN in value for _, value, _ in turns):
        first_user = next((i for i, (role, _, _) in enumerate(turns) if role == "user"), None)
        if first_user is not None:
            role, value, where = turns[first_user]
            turns[first_user] = (role, IMAGE_TOKEN + value, where)

    queues = {IMAGE_TOKEN: list(images), VIDEO_TOKEN: list(videos)}
    used = {IMAGE_TOKEN: 0, VIDEO_TOKEN: 0}
    messages = []
    for role, value, where in turns:
        chunks = _split_placeholders(value)
        parts: list[Part] = []
        for position, chunk in enumerate(chunks):
            if chunk in queues:
                if used[chunk] == len(queues[chunk]):
                    raise MissingMediaError(
                        f"{where} has {chunk} placeholder number {used[chunk] + 1} but only "
                        f"{len(queues[chunk])} {_media_kind(chunk)} were given for its placeholders",
                        reason=f"{_media_kind(chunk)[:-1]}_count_mismatch",
                    )
                source = queues[chunk][used[chunk]]
                used[chunk] += 1
                parts.append(ImagePart(source) if chunk == IMAGE_TOKEN else VideoPart(source))
                continue
            if position > 0:  # follows a placeholder
                chunk = chunk.removeprefix("\n")
            if position < len(chunks) - 1:  # precedes one
                chunk = chunk.removesuffix("\n")
            if chunk:
                parts.append(TextPart(chunk))
        if _is_empty(parts, blank_is_empty):
            raise EmptyContentError(f"{where} ({role}) has empty content")
        messages.append(Message(role=role, parts=tuple(parts)))
    for token, queue in queues.items():
        if used[token] != len(queue):
            raise ChatFormatError(
                f"{len(queue)} {_media_kind(token)} were given but the conversation has only {used[token]} "
                f"{token} placeholders", reason=f"{_media_kind(token)[:-1]}_count_mismatch"
            )
    validate_conversation(messages)
    return messages


def _media_kind(placeholder: str) -> str:
    return "images" if placeholder == IMAGE_TOKEN else "videos"


def _split_placeholders(value: str) -> list[str]:
    """``"a<image>b<video>"`` -> ``["a", "<image>", "b", "<video>", ""]``: text and
    placeholders alternate, starting and ending with (possibly empty) text."""
    chunks: list[str] = []
    rest = value
    while True:
        positions = [(rest.find(t), t) for t in (IMAGE_TOKEN, VIDEO_TOKEN) if t in rest]
        if not positions:
            chunks.append(rest)
            return chunks
        pos, token = min(positions)
        chunks.extend([rest[:pos], token])
        rest = rest[pos + len(token) :]


def validate_conversation(messages: Sequence[Message], *, for_training: bool = False,
                          require_user: bool = False) -> None:
    """Check the rules every renderable conversation follows.

    * at least one message; a system message only comes first;
    * text is valid Unicode (:class:`TextEncodingError` names the offending byte);
    * images and videos only in user messages (:class:`MediaNotAllowedError`);
    * with ``require_user`` (rendering), at least one user message (:class:`MissingUserTurnError`);
    * with ``for_training``, at least one assistant message (:class:`MissingAssistantTurnError`).
    """
    if not messages:
        raise EmptyContentError("the conversation has no messages", reason="bad_format")
    for index, message in enumerate(messages):
        for part in message.parts:
            if isinstance(part, TextPart):
                check_text_encoding(part.text, f"message #{index} ({message.role})")
        if message.role not in ROLES:
            raise UnknownRoleError(f"message #{index} has role {message.role!r}; expected one of {ROLES}")
        if not message.parts:
            raise EmptyContentError(f"message #{index} ({message.role}) has empty content")
        if message.role == "system" and index > 0:
            raise ChatFormatError(f"message #{index} is a system message; a system message may only come first")
        if message.media and message.role != "user":
            kinds = sorted({type(p).__name__ for p in message.media})
            raise MediaNotAllowedError(
                f"message #{index} ({message.role}) contains {kinds}; images and videos may only "
                f"appear in user messages"
            )
    if require_user and not any(m.role == "user" for m in messages):
        raise MissingUserTurnError(
            f"the conversation has no user message (roles {[m.role for m in messages]}); a model answers "
            f"a user turn: add one")
    if for_training and not any(m.role == "assistant" for m in messages):
        raise MissingAssistantTurnError(
            "a training sample needs at least one assistant message (its answer is what is "
            f"supervised); got roles {[m.role for m in messages]}"
        )


def check_text_encoding(text: str, where: str) -> None:
    """Raise :class:`TextEncodingError` naming the first character of ``text`` that is not valid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(text[err.start])
        what = (f"byte 0x{char - 0xDC00:02x}, which is not UTF-8," if 0xDC80 <= char <= 0xDCFF
                else f"the lone surrogate U+{char:04X}")
        raise TextEncodingError(f"{where} text has {what} at character {err.start} "
                                f"({text[max(0, err.start - 20):err.start]!r} before it); expected UTF-8 text") from None


def to_hf_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Normalised messages -> Hugging Face chat dicts, every content a list of items (the inverse
    of :func:`normalize_messages`: ``normalize_messages(to_hf_messages(m)) == m``)."""
    return [{"role": m.role, "content": [_hf_item(part) for part in m.parts]} for m in messages]


def _hf_item(part: Part) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        return {"type": "image", "image": part.image}
    item = {"type": "video", "video": part.video}
    if part.fps is not None:
        item["fps"] = part.fps
    return item


# ---- template (ChatML) -----------------------------------------------------------------------
def chat_segments(messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[Segment]:
    """The template of the module docstring as segments, media left as :class:`MediaSegment`.

    Adjacent text with the same supervision is merged into one segment, so that, for example,
    ``"user\\n"`` and the question are tokenised together as they read.
    """
    segments: list[Segment] = []
    for message in messages:
        supervised = message.role == "assistant"
        segments += [SpecialSegment(IM_START_TOKEN), TextSegment(f"{message.role}\n")]
        for part in message.parts:
            segments.append(TextSegment(part.text, supervised) if isinstance(part, TextPart) else MediaSegment(part))
        segments += [SpecialSegment(IM_END_TOKEN, supervised), TextSegment("\n")]
    if add_generation_prompt:
        segments += [SpecialSegment(IM_START_TOKEN), TextSegment("assistant\n")]
    return merge_text_segments(segments)


def image_segments(image_seq_len: int, rows: int = 0, cols: int = 0) -> list[Segment]:
    """Placeholder segments of one image: ``image_seq_len`` tokens per view.

    Unsplit (``rows == cols == 0``): ``<image> * image_seq_len``. Split into a ``rows x cols``
    grid (views: tiles row-major, then the global view, as :class:`minivlm.vision.ImageProcessor`
    returns them)::

        <row_1_col_1><image>*N<row_1_col_2><image>*N\\n
        <row_2_col_1><image>*N<row_2_col_2><image>*N\\n
        <global-img><image>*N

    This is Idefics3/SmolVLM's ``_prompt_split_image`` without its ``<fake_token_around_image>``
    wrappers and the blank line before the global view.
    """
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be >= 1; got {image_seq_len}")
    if (rows == 0) != (cols == 0) or rows < 0 or cols < 0:
        raise ValueError(f"a tile grid needs rows and cols both 0 (unsplit) or both >= 1; got {rows}x{cols}")
    image = SpecialSegment(IMAGE_TOKEN, repeat=image_seq_len)
    if rows == 0:
        return [image]
    segments: list[Segment] = []
    for row in range(1, rows + 1):
        for col in range(1, cols + 1):
            segments += [SpecialSegment(tile_token(row, col)), image]
        segments.append(TextSegment("\n"))
    segments += [SpecialSegment(GLOBAL_IMAGE_TOKEN), image]
    return segments


def video_frame_segments(timestamp: float, image_seq_len: int) -> list[Segment]:
    """One video frame: its time as ``"mm:ss "`` text, then its image tokens (SmolVLM2 style)."""
    return [TextSegment(f"{format_timestamp(timestamp)} ")] + image_segments(image_seq_len)
