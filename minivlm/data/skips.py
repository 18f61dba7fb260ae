"""Lenient reading shared by the data files and the shard sources: a bad record is skipped and
counted by reason (or raised when strict), and ``dataset[i]`` of one returns the next loadable."""

from __future__ import annotations

import logging
from collections import Counter
from abc import ABC, abstractmethod
from typing import Any

from minivlm.data.sample import DataError

logger = logging.getLogger(__name__)


class SkippingReader(ABC):
    """Mixin: ``skipped`` (a Counter by reason) and the records that failed in this process.

    Subclasses call :meth:`_init_skips` and implement :meth:`_load_position` (a sample, or
    DataError); DataLoader workers count their own skips in their own copy.
    """

    strict: bool

    def _init_skips(self, strict: bool) -> None:
        self.strict = strict
        self.skipped: Counter[str] = Counter()
        self._failed: set[int] = set()  # positions that failed here: counted once, never retried

    @abstractmethod
    def _load_position(self, position: int) -> dict[str, Any]:
        """The sample at ``position`` (media decoded), or DataError."""

    def _try_load(self, position: int) -> dict[str, Any] | None:
        """The sample at ``position``, or None (counted, logged) when the record is bad."""
        try:
            return self._load_position(position)
        except DataError as error:
            self._failed.add(position)
            self._reject(error)
            return None

    def _first_loadable(self, position: int, count: int, where: str) -> dict[str, Any]:
        """The sample at ``position`` or, when that record is bad, at the next loadable one
        (wrapping around): deterministic, so an index stays a pure function of the data."""
        position = range(count)[position]  # negative indices and IndexError like a list
        for offset in range(count):
            candidate = (position + offset) % count
            if candidate not in self._failed:
                sample = self._try_load(candidate)
                if sample is not None:
                    return sample
        raise DataError(f"every record failed to load ({self._skip_text()})", reason="no_records", source=where)

    def _reject(self, error: DataError) -> None:
        if self.strict:
            raise error
        self.skipped[error.reason] += 1
        logger.warning("skipped record [%s] %s", error.reason, error)

    def _skip_text(self) -> str:
        total = sum(self.skipped.values())
        if not total:
            return "0 skipped"
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
        return f"{total} skipped ({reasons})"

