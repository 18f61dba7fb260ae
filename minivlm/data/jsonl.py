"""User data from disk: chat JSONL and LLaVA JSON, loaded as minivlm chat samples.

**Chat JSONL**: one sample per line, in the sample format (:mod:`minivlm.data.sample`) with image
*paths* relative to the JSONL file's directory::

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/cat.jpg"},
                                               {"type": "text", "text": "What animal is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}],
     "id": "optional", "task": "optional", "question_type": "optional"}

String contents are accepted (``"content": "hi"``); a video is a list of frame paths
(``{"type": "video", "video": ["f0.png", "f1.png"]}``).

**LLaVA JSON** (the LLaVA-1.5 instruction format, github.com/haotian-liu/LLaVA): a JSON array of
``{"id", "image", "conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``, images
relative to an image folder. Each ``<image>`` placeholder becomes an image item at its position
(the newline that conventionally separates it from the text is dropped). ``"image"`` may be a
list (LLaVA-OneVision multi-image); a record with one image and no placeholder gets the image
before the first human turn, as LLaVA's own preprocessing does.

**Bad input never becomes a silently wrong sample.** Every record is checked when the file is
indexed (structure, roles, empty turns, a missing assistant turn, image paths that are missing or
escape the dataset root, directly or through a symlink); images are decoded lazily in
``__getitem__`` (or up front with ``verify_images=True``). With ``strict=True`` the first problem
raises :class:`~minivlm.data.sample.DataError` naming the file and line. Otherwise the record is
skipped, counted in ``dataset.skipped`` (a Counter by reason) and logged as a warning naming the
file and line; ``dataset.summary()`` totals them and is logged after indexing and at the end of
each full iteration. A record whose image turns out corrupt when ``__getitem__`` decodes it is
replaced by the next loadable record (deterministically, so the index stays a pure function of
the file), since a map-style dataset must return something for every index; DataLoader workers
count such skips in their own copy of ``skipped``.

A malformed LLaVA JSON *document* always raises: after a syntax error the rest of the array
cannot be trusted to line up with records.
"""

from __future__ import annotations

import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from minivlm.data.sample import DataError, last_assistant_text, normalise_messages
from minivlm.vision import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
_JSON_WHITESPACE = re.compile(r"[ \t\r\n]*")
#: LLaVA speaker names (and the plain role names some converted sets use) -> chat roles.
LLAVA_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}


@dataclass
class _Record:
    """A validated record: media items hold resolved ``Path`` objects, not yet decoded."""

    source: str  # "file:line"
    messages: list[dict[str, Any]]
    metadata: dict[str, Any] = field(default_factory=dict)


class _ChatFileDataset(Dataset, ABC):
    """Shared indexing, path checking, lazy loading and skip accounting of the file datasets."""

    #: Default ``task`` field of the samples.
    task: str

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_root: str | os.PathLike,
        strict: bool,
        require_assistant: bool,
        max_pixels: int | None,
        verify_images: bool,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such data file")
        self.image_root = Path(image_root).resolve()
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"{image_root}: image root is not a directory")
        self.strict = strict
        self.require_assistant = require_assistant
        self.max_pixels = max_pixels
        self.skipped: Counter[str] = Counter()
        self._records: list[_Record] = []
        self._failed: set[int] = set()  # records whose images failed to decode in this process
        for line, raw in self._read_raw_records():
            try:
                self._records.append(self._parse(raw, line))
            except DataError as error:
                self._reject(error)
        if verify_images:
            self._verify_images()
        if not self._records:
            raise DataError(
                f"no usable records ({self._skip_text()})",
                reason="no_records",
                source=str(self.path),
            )
        self._log_summary()

    # --- format-specific parts -------------------------------------------------------------

    @abstractmethod
    def _read_raw_records(self) -> Iterator[tuple[int, Any]]:
        """Yield ``(line where the record starts, raw record)`` per record."""

    @abstractmethod
    def _parse(self, raw: Any, line: int) -> _Record:
        """Turn one raw record into a validated :class:`_Record` or raise DataError."""

    def _where(self, line: int) -> str:
        return f"{self.path}:{line}"

    # --- public API -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample of record ``index``; if its images fail to decode (and not strict), the
        next loadable record's sample (see the module docstring)."""
        count = len(self._records)
        index = range(count)[index]
        for offset in range(count):
            position = (index + offset) % count
            if position in self._failed:
                continue
            sample = self._try_load(position)
            if sample is not None:
                return sample
        raise DataError(
            f"every record failed to load ({self._skip_text()})",
            reason="no_records",
            source=str(self.path),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """All loadable samples once, in file order (failed records are skipped, not replaced);
        logs :meth:`summary` at the end."""
        for position in range(len(self._records)):
            if position not in self._failed:
                sample = self._try_load(position)
                if sample is not None:
                    yield sample
        self._log_summary()

    def summary(self) -> str:
        """One line: how many records are usable and how many were skipped, by reason."""
        usable = len(self._records) - len(self._failed)
        return f"{self.path}: {usable} usable records, {self._skip_text()}"

    # --- helpers ----------------------------------------------------------------------------

    def _log_summary(self) -> None:
        logger.log(logging.WARNING if self.skipped else logging.INFO, "%s", self.summary())

    def _skip_text(self) -> str:
        total = sum(self.skipped.values())
        if not total:
            return "0 skipped"
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
        return f"{total} skipped ({reasons})"

    def _reject(self, error: DataError) -> None:
        if self.strict:
            raise error
        self.skipped[error.reason] += 1
        logger.warning("skipped record [%s] %s", error.reason, error)

    def _try_load(self, position: int) -> dict[str, Any] | None:
        try:
            return self._load(self._records[position])
        except DataError as error:
            self._failed.add(position)
            self._reject(error)
            return None

    def _load(self, record: _Record) -> dict[str, Any]:
        """Decode the record's media and build the sample dict."""
        messages = []
        for message in record.messages:
            content = [self._load_item(item, record.source) for item in message["content"]]
            messages.append({**message, "content": content})
        sample: dict[str, Any] = {"messages": messages, **record.metadata}
        answer = last_assistant_text(messages)
        if answer is not None:
            sample["answer"] = answer
        return sample

    def _load_item(self, item: dict[str, Any], source: str) -> dict[str, Any]:
        if item["type"] == "image":
            return {**item, "image": self._decode(item["image"], source)}
        if item["type"] == "video":
            return {**item, "video": [self._decode(frame, source) for frame in item["video"]]}
        return item

    def _decode(self, path: Path, source: str) -> Image.Image:
        try:
            return load_image(path, max_pixels=self.max_pixels)
        except ImageLoadError as error:
            raise DataError(str(error), reason="corrupt_image", source=source) from error

    def _verify_images(self) -> None:
        kept = []
        for record in self._records:
            try:
                self._load(record)
            except DataError as error:
                self._reject(error)
            else:
                kept.append(record)
        self._records = kept

    def _resolve_messages(
        self, messages: list[dict[str, Any]], source: str
    ) -> list[dict[str, Any]]:
        return [
            {**m, "content": [self._resolve_media(item, source) for item in m["content"]]}
            for m in messages
        ]

    def _resolve_media(self, item: dict[str, Any], source: str) -> dict[str, Any]:
        """Replace an image/video item's path string(s) by checked, resolved paths."""
        if item["type"] == "image":
            return {**item, "image": self._resolve_path(item["image"], source)}
        if item["type"] == "video":
            frames = item["video"]
            if not isinstance(frames, list):
                raise DataError(
                    f"a video item needs a list of frame paths, got {type(frames).__name__}",
                    reason="bad_format",
                    source=source,
                )
            return {**item, "video": [self._resolve_path(frame, source) for frame in frames]}
        return item

    def _resolve_path(self, value: Any, source: str) -> Path:
        """An image path inside ``image_root`` (relative to it, or absolute inside it).

        The check runs on the fully resolved path, so ``..`` segments and symlinks that lead out
        of the root are refused before anything outside it is opened.
        """
        if not isinstance(value, str) or not value:
            raise DataError(
                f"an image path must be a non-empty string, got {value!r}",
                reason="bad_format",
                source=source,
            )
        candidate = Path(value)
        resolved = (candidate if candidate.is_absolute() else self.image_root / candidate).resolve()
        if not resolved.is_relative_to(self.image_root):
            raise DataError(
                f"image path {value!r} resolves to {resolved}, outside the dataset root "
                f"{self.image_root}",
                reason="path_escape",
                source=source,
            )
        if not resolved.is_file():
            raise DataError(
                f"image {value!r} not found (looked for {resolved})",
                reason="missing_image",
                source=source,
            )
        return resolved


class ChatJsonlDataset(_ChatFileDataset):
    """Chat-format JSONL (see the module docstring).

    Args:
        path: the ``.jsonl`` file.
        image_root: directory image paths are relative to, and may not leave; default: the
            JSONL file's directory.
        strict: raise :class:`DataError` on the first bad record instead of skipping it.
        require_assistant: a record needs an assistant turn (True for training data; False for
            prompts to generate from).
        max_pixels: passed to :func:`minivlm.vision.load_image` (decompression-bomb limit).
        verify_images: decode every image while indexing, so corrupt files are found (and
            skipped or raised) up front rather than during training.
    """

    task = "jsonl"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_root: str | os.PathLike | None = None,
        strict: bool = False,
        require_assistant: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        verify_images: bool = False,
    ) -> None:
        super().__init__(
            path,
            image_root=image_root if image_root is not None else Path(path).parent,
            strict=strict,
            require_assistant=require_assistant,
            max_pixels=max_pixels,
            verify_images=verify_images,
        )

    def _read_raw_records(self) -> Iterator[tuple[int, bytes]]:
        # Bytes, decoded per line: one line that is not UTF-8 is one bad record, not a crash of
        # the whole file (and never a silently "replaced" character).
        with open(self.path, "rb") as file:
            for line_number, line in enumerate(file, start=1):
                if line.strip():  # blank lines (e.g. a trailing newline) are not records
                    yield line_number, line

    def _parse(self, raw: bytes, line: int) -> _Record:
        source = self._where(line)
        try:
            raw = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise DataError(
                f"line is not valid UTF-8 ({error})", reason="bad_json", source=source
            ) from error
        except json.JSONDecodeError as error:
            raise DataError(
                f"malformed JSON line ({error})", reason="bad_json", source=source
            ) from error
        if not isinstance(raw, dict) or "messages" not in raw:
            raise DataError(
                f"expected an object with a 'messages' list, got {type(raw).__name__}",
                reason="bad_format",
                source=source,
            )
        messages = normalise_messages(
            raw["messages"], require_assistant=self.require_assistant, source=source
        )
        messages = self._resolve_messages(messages, source)
        metadata = {
            "task": str(raw.get("task", self.task)),
            "id": str(raw.get("id", f"{self.path.stem}/{line}")),
        }
        if "question_type" in raw:
            metadata["question_type"] = str(raw["question_type"])
        return _Record(source, messages, metadata)


class LlavaJsonDataset(_ChatFileDataset):
    """LLaVA-format JSON (see the module docstring).

    Args:
        path: the ``.json`` file (a JSON array of records).
        image_folder: directory the records' ``"image"`` paths are relative to, and may not
            leave; default: the JSON file's directory.
        strict, require_assistant, max_pixels, verify_images: as :class:`ChatJsonlDataset`.

    Warnings and errors name the line on which a record starts.
    """

    task = "llava"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_folder: str | os.PathLike | None = None,
        strict: bool = False,
        require_assistant: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        verify_images: bool = False,
    ) -> None:
        super().__init__(
            path,
            image_root=image_folder if image_folder is not None else Path(path).parent,
            strict=strict,
            require_assistant=require_assistant,
            max_pixels=max_pixels,
            verify_images=verify_images,
        )

    def _read_raw_records(self) -> Iterator[tuple[int, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DataError(
                f"file is not valid UTF-8 ({error})", reason="bad_json", source=str(self.path)
            ) from error
        yield from iter_json_array(text, str(self.path))

    def _parse(self, raw: Any, line: int) -> _Record:
        source = self._where(line)
        if not isinstance(raw, dict) or not isinstance(raw.get("conversations"), list):
            raise DataError(
                "expected an object with a 'conversations' list", reason="bad_format", source=source
            )
        images = raw.get("image")
        image_paths = [] if images is None else images if isinstance(images, list) else [images]
        messages = llava_to_messages(raw["conversations"], image_paths, source)
        messages = normalise_messages(
            messages, require_assistant=self.require_assistant, source=source
        )
        messages = self._resolve_messages(messages, source)
        metadata = {"task": self.task, "id": str(raw.get("id", f"{self.path.stem}/{line}"))}
        return _Record(source, messages, metadata)


def llava_to_messages(
    conversations: list[Any], image_paths: list[Any], source: str = ""
) -> list[dict[str, Any]]:
    """LLaVA ``conversations`` -> chat messages, each ``<image>`` becoming an image item in place.

    Image items hold the path strings from ``image_paths``, in order of appearance.

    Raises:
        DataError: ``bad_format`` (a turn is not ``{"from", "value": str}``), ``unknown_role``,
            ``image_count_mismatch`` (placeholders and images disagree).
    """
    turns = []
    for position, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(
                f"turn {position} must be {{'from': ..., 'value': str}}, got {turn!r:.80}",
                reason="bad_format",
                source=source,
            )
        speaker = turn.get("from")
        if speaker not in LLAVA_ROLES:
            raise DataError(
                f"turn {position} is from {speaker!r}; expected one of {tuple(LLAVA_ROLES)}",
                reason="unknown_role",
                source=source,
            )
        turns.append((LLAVA_ROLES[speaker], turn["value"]))
    n_placeholders = sum(value.count(IMAGE_PLACEHOLDER) for _, value in turns)
    if n_placeholders == 0 and len(image_paths) == 1:
        first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first_user is not None:
            turns[first_user] = ("user", f"{IMAGE_PLACEHOLDER}\n{turns[first_user][1]}")
            n_placeholders = 1
    if n_placeholders != len(image_paths):
        raise DataError(
            f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(image_paths)} images",
            reason="image_count_mismatch",
            source=source,
        )
    remaining_images = iter(image_paths)
    messages = []
    for role, value in turns:
        content: list[dict[str, Any]] = []
        pieces = value.split(IMAGE_PLACEHOLDER)
        for index, piece in enumerate(pieces):
            # "<image>\nQ" and "Q\n<image>": the newline only separates the placeholder.
            if index > 0:
                content.append({"type": "image", "image": next(remaining_images)})
                piece = piece.removeprefix("\n")
            if index < len(pieces) - 1:
                piece = piece.removesuffix("\n")
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    return messages


def iter_json_array(text: str, name: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(line where the element starts, element)`` for each element of a JSON array.

    Raises:
        DataError: ``bad_json`` naming the line and column when the document is malformed.
    """
    decoder = json.JSONDecoder()
    line = 1
    position = _skip_whitespace(text, 0)

    def fail(message: str, at: int) -> DataError:
        line_at = text.count("\n", 0, at) + 1
        column = at - text.rfind("\n", 0, at)
        return DataError(
            f"malformed JSON document: {message} (column {column})",
            reason="bad_json",
            source=f"{name}:{line_at}",
        )

    if text[position : position + 1] != "[":
        raise fail("expected a JSON array of records ('[')", position)
    previous = 0
    position = _skip_whitespace(text, position + 1)
    if text[position : position + 1] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise fail(error.msg, error.pos) from error
        line += text.count("\n", previous, position)
        previous = position
        yield line, value
        position = _skip_whitespace(text, end)
        separator = text[position : position + 1]
        if separator == ",":
            position = _skip_whitespace(text, position + 1)
        elif separator == "]":
            break
        else:
            raise fail("expected ',' or ']' after an array element", position)
    if _skip_whitespace(text, position + 1) != len(text):
        raise fail("unexpected data after the array", _skip_whitespace(text, position + 1))


def _skip_whitespace(text: str, position: int) -> int:
    return _JSON_WHITESPACE.match(text, position).end()
