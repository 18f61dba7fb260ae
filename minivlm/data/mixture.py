"""A weighted, deterministic mixture of map-style datasets.

Sample ``i`` of a :class:`Mixture` comes from source ``s(i)`` drawn with probability proportional
to the weights by a generator seeded with ``seed``; the draws for all indices are made once, up
front, so sample ``i`` is a pure function of ``(seed, i)`` and a resumed run or a DataLoader
worker sees the same thing. Within a source the mixture walks through the data without
replacement: the ``k``-th time source ``s`` is drawn it yields item ``perm_e[k mod len(s)]``,
where ``perm_e`` is a seeded permutation that changes with each pass ``e = k // len(s)``, so
a small source is reshuffled each time the mixture exhausts it instead of repeating its order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch.utils.data import Dataset

# Separates the mixture's random streams from anything else seeded with the same user seed.
_SOURCE_STREAM, _PERMUTATION_STREAM = 0x6D6978, 0x7065726D


def check_weight(name: str, weight: Any) -> float:
    """``weight`` as a float, or ValueError unless it is a finite positive number."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"weight of source {name!r} must be a positive number, got {weight!r}")
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"weight of source {name!r} must be a finite number > 0, got {weight!r}")
    return float(weight)


class Mixture(Dataset):
    """Deterministic weighted mixture (see the module docstring).

    Args:
        sources: name -> dataset (map-style, non-empty). Order fixes the source ids.
        weights: name -> positive weight, normalised to probabilities; None: equal weights.
        length: number of samples; None: the sum of the sources' lengths.
        seed: seeds both the source draws and the per-pass permutations.
    """

    def __init__(
        self,
        sources: Mapping[str, Dataset],
        weights: Mapping[str, float] | None = None,
        length: int | None = None,
        seed: int = 0,
    ) -> None:
        if not sources:
            raise ValueError("a mixture needs at least one source")
        self.names = list(sources)
        self.sources = [sources[name] for name in self.names]
        for name, source in zip(self.names, self.sources):
            if len(source) == 0:
                raise ValueError(f"source {name!r} is empty")
        weights = weights if weights is not None else {name: 1.0 for name in self.names}
        if set(weights) != set(self.names):
            raise ValueError(
                f"weights must name exactly the sources {self.names}, got {sorted(weights)}"
            )
        raw = np.array([check_weight(name, weights[name]) for name in self.names])
        self.probabilities = raw / raw.sum()
        if length is None:
            length = sum(len(source) for source in self.sources)
        if not isinstance(length, int) or length <= 0:
            raise ValueError(f"length must be a positive integer, got {length!r}")
        self.length = length
        self.seed = seed
        generator = np.random.default_rng([_SOURCE_STREAM, seed])
        dtype = np.uint8 if len(self.names) <= 255 else np.int32
        # [length] source id of each sample, and [length] how many earlier samples share it.
        self._source_ids = generator.choice(
            len(self.names), size=length, p=self.probabilities
        ).astype(dtype)
        self._occurrence = np.empty(length, dtype=np.int64)
        for source_id in range(len(self.names)):
            positions = np.flatnonzero(self._source_ids == source_id)
            self._occurrence[positions] = np.arange(positions.size)
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}  # source id -> (pass, perm)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        source_id, source_index = self._locate(index)
        return self.sources[source_id][source_index]

    def locate(self, index: int) -> tuple[str, int]:
        """``(source name, index within that source)`` of mixture sample ``index``."""
        source_id, source_index = self._locate(index)
        return self.names[source_id], source_index

    def _locate(self, index: int) -> tuple[int, int]:
        index = range(self.length)[index]  # negative indices and IndexError like a list
        source_id = int(self._source_ids[index])
        size = len(self.sources[source_id])
        epoch, offset = divmod(int(self._occurrence[index]), size)
        return source_id, int(self._permutation(source_id, epoch, size)[offset])

    def counts(self) -> dict[str, int]:
        """How many of the mixture's samples each source provides."""
        totals = np.bincount(self._source_ids, minlength=len(self.names))
        return {name: int(total) for name, total in zip(self.names, totals)}

    def summary(self) -> str:
        parts = [
            f"{name} {count} ({count / self.length:.1%}, weight {p:.3f})"
            for (name, count), p in zip(self.counts().items(), self.probabilities)
        ]
        return f"mixture of {self.length} samples: " + ", ".join(parts)

    def _permutation(self, source_id: int, epoch: int, size: int) -> np.ndarray:
        # One cached permutation per source: consecutive indices almost always share a pass.
        cached = self._permutations.get(source_id)
        if cached is None or cached[0] != epoch:
            generator = np.random.default_rng([_PERMUTATION_STREAM, self.seed, source_id, epoch])
            cached = (epoch, generator.permutation(size))
            self._permutations[source_id] = cached
        return cached[1]

    def __repr__(self) -> str:
        weights = ", ".join(f"{n}={p:.3f}" for n, p in zip(self.names, self.probabilities))
        return f"Mixture({weights}; length={self.length}, seed={self.seed})"
