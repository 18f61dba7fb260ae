"""Base class of the procedural datasets: sample ``i`` is a pure function of ``(seed, split, i)``.

Each synthetic task renders its samples on the fly from a private ``random.Random`` seeded by a
stable hash of ``(task, seed, split, i)``. That gives, at no storage cost:

* **determinism**: the same seed gives identical pixels in any process, any run;
* **parallel rendering**: DataLoader workers render disjoint indices independently;
* **resumable training**: a run restarted at data position ``k`` sees samples ``k, k+1, ...``;
* **disjoint splits**: ``train`` and ``test`` draw from different seed streams (and every task has
  its own stream, so tasks in a mixture are uncorrelated).

The train split is "effectively infinite" (``length`` defaults to 1,000,000; any length works)
and the test split is small and fixed (500), so evaluation numbers are comparable across runs.

Every task generates *answer first*: it draws the question type and the answer uniformly, then a
scene consistent with that answer. Answers are therefore balanced per question type, and the
question never carries the answer (no language prior to exploit).
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from typing import Any

from torch.utils.data import Dataset

SPLITS = ("train", "test")
#: Below this, 0.16-wide shapes are ~7 pixels and the gaps between them 2: no longer legible.
MIN_IMAGE_SIZE = 48
DEFAULT_LENGTHS = {"train": 1_000_000, "test": 500}


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from ``parts`` that is the same in every process.

    Python's ``hash`` of a string is salted per process (PYTHONHASHSEED), so it cannot seed
    DataLoader workers consistently; BLAKE2 of the joined parts can.
    """
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class SyntheticDataset(Dataset, ABC):
    """Map-style dataset of procedurally rendered samples (see the module docstring).

    Args:
        split: ``"train"`` or ``"test"`` (different seed streams).
        seed: base seed; the same seed reproduces the same samples.
        image_size: side of the square images in pixels (>= 48; 64 by default, 224 works).
        length: number of samples; ``None`` uses 1,000,000 for train and 500 for test.
    """

    #: Name used in sample ids, the ``task`` field and the seed stream.
    task: str = ""
    #: Question types a subclass can ask; ``question_types`` selects a subset.
    QUESTION_TYPES: tuple[str, ...] = ()

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        image_size: int = 64,
        length: int | None = None,
        question_types: tuple[str, ...] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be an integer >= {MIN_IMAGE_SIZE} pixels, got {image_size!r}"
            )
        if length is not None and (not isinstance(length, int) or length <= 0):
            raise ValueError(f"length must be a positive integer or None, got {length!r}")
        self.question_types = tuple(question_types or self.QUESTION_TYPES)
        unknown = sorted(set(self.question_types) - set(self.QUESTION_TYPES))
        if unknown or not self.question_types:
            raise ValueError(
                f"{self.task}: question_types must be a non-empty subset of "
                f"{self.QUESTION_TYPES}, got {question_types!r}"
            )
        self.split = split
        self.seed = seed
        self.image_size = image_size
        self.length = DEFAULT_LENGTHS[split] if length is None else length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.length <= index < self.length:
            raise IndexError(f"{self.task} index {index} out of range for length {self.length}")
        index %= self.length
        rng = random.Random(stable_seed(self.task, self.seed, self.split, index))
        return self.generate(rng, sample_id=f"{self.task}/{self.split}/{index}")

    def scene(self, index: int) -> Any:
        """The scene description sample ``index`` was rendered from (ground truth for tests)."""
        return self[index]["scene"]

    @abstractmethod
    def generate(self, rng: random.Random, sample_id: str) -> dict[str, Any]:
        """Draw one sample from ``rng`` (its only source of randomness)."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, seed={self.seed}, "
            f"image_size={self.image_size}, length={self.length})"
        )
