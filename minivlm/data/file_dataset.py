"""What the data-file datasets share: a lazy record index, checks on read, and skip accounting.

A file dataset indexes where its records are when it is built (:mod:`minivlm.data.json_index`:
seconds for half a million records) and parses, validates, resolves and decodes a record only
when it is read. **Bad input never becomes a silently wrong sample**: a record that fails
(malformed JSON, structure, roles, empty turns, a missing assistant turn, image paths that are
missing or escape the image root, directly or through a symlink, an image that does not decode)
is skipped, counted in ``dataset.skipped`` (a Counter by reason) and logged as a warning naming
the file and line; ``dataset.summary()`` totals them and is logged at the end of each full
iteration. With ``strict=True`` the first problem raises :class:`~minivlm.data.sample.DataError`
instead. Since a map-style dataset must return something for every index, ``dataset[i]`` of a
bad record returns the next loadable record (deterministically, so an index stays a pure
function of the file); DataLoader workers count such skips in their own copy of ``skipped``.

``verify=True`` checks every record while indexing instead (the bad ones are dropped from the
index, so ``len`` counts usable records), and ``verify_images=True`` also decodes every image:
slower starts, but a broken file is found before training rather than during it.
"""

from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from minivlm.data.json_index import RecordIndex, read_record
from minivlm.data.media import MediaRoot
from minivlm.data.sample import DataError, sample_from_messages
from minivlm.data.skips import SkippingReader
from minivlm.text.chat import Message
from minivlm.vision import DEFAULT_MAX_PIXELS

logger = logging.getLogger(__name__)


@dataclass
class Record:
    """A checked record: media paths resolved, not yet decoded."""

    source: str  # "file:line"
    messages: list[Message]
    metadata: dict[str, Any] = field(default_factory=dict)


class ChatFileDataset(SkippingReader, Dataset, ABC):
    """A map-style dataset over the records of one file (see the module docstring).

    Subclasses index the file (:meth:`_index`) and build one checked :class:`Record`
    (:meth:`record`); :class:`JsonRecordDataset` does the latter for records stored as JSON.
    """

    #: Default ``task`` field of the samples.
    task: str

    def __init__(self, path: str | os.PathLike, *, image_root: str | os.PathLike | None = None, strict: bool = False,
                 require_assistant: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS, verify: bool = False,
                 verify_images: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such data file")
        # Media paths are relative to image_root, by default the data file's own folder.
        self.media = MediaRoot(image_root if image_root is not None else self.path.parent, max_pixels)
        self._init_skips(strict)
        self.require_assistant = require_assistant
        self._fd: int | None = None  # the file, opened per process (DataLoader workers open their own)
        self.index: RecordIndex = self._index()
        if verify or verify_images:
            self._verify(decode=verify_images)
        if not len(self.index):
            raise DataError(f"no usable records ({self._skip_text()})", reason="no_records", source=str(self.path))
        if verify or verify_images:
            self._log_summary()

    @property
    def image_root(self) -> Path:
        return self.media.root

    # --- format-specific parts -------------------------------------------------------------
    @abstractmethod
    def _index(self) -> RecordIndex:
        """Where the file's records are."""

    @abstractmethod
    def record(self, position: int) -> Record:
        """Record ``position`` parsed and checked, media resolved but not decoded (or DataError)."""

    def _where(self, line: int) -> str:
        return f"{self.path}:{line}"

    # --- public API -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample of record ``index``; if it is bad (and not strict), the next loadable one."""
        return self._first_loadable(index, len(self.index), str(self.path))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """All loadable samples once, in file order (bad records are skipped, not replaced);
        logs :meth:`summary` at the end."""
        for position in range(len(self.index)):
            if position not in self._failed:
                sample = self._try_load(position)
                if sample is not None:
                    yield sample
        self._log_summary()

    def summary(self) -> str:
        """One line: how many records are usable and how many were skipped, by reason."""
        usable = len(self.index) - len(self._failed)
        return f"{self.path}: {usable} usable records, {self._skip_text()}"

    # --- helpers ----------------------------------------------------------------------------
    def _file(self) -> int:
        """The data file, opened once per process (for ``pread``)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _log_summary(self) -> None:
        logger.log(logging.WARNING if self.skipped else logging.INFO, "%s", self.summary())

    def _load_position(self, position: int) -> dict[str, Any]:
        return self._load(self.record(position))

    def _load(self, record: Record) -> dict[str, Any]:
        return sample_from_messages(self.media.load(record.messages, record.source), **record.metadata)

    def _verify(self, decode: bool) -> None:
        keep = np.ones(len(self.index), dtype=bool)
        for position in range(len(self.index)):
            try:
                record = self.record(position)
                if decode:
                    self._load(record)
            except DataError as error:
                self._reject(error)
                keep[position] = False
        self.index = self.index.select(keep)


class JsonRecordDataset(ChatFileDataset, ABC):
    """A file dataset whose records are JSON values at the index's byte ranges."""

    def record(self, position: int) -> Record:
        raw = read_record(self._file(), self.index, position)
        return self._parse(raw, int(self.index.lines[position]))

    @abstractmethod
    def _parse(self, raw: bytes, line: int) -> Record:
        """One record's bytes -> a checked :class:`Record` (media resolved), or DataError."""


def decode_json(raw: bytes, source: str) -> Any:
    """One record's JSON (UTF-8) -> a Python value, or DataError ``bad_json``. Bytes are decoded
    per record: one record that is not UTF-8 is one bad record, never a silently replaced
    character or a crash of the whole file."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"record is not valid UTF-8 ({error})", reason="bad_json", source=source) from error
    except json.JSONDecodeError as error:
        raise DataError(f"malformed JSON record ({error})", reason="bad_json", source=source) from error
