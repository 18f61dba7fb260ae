"""Sharded sources for pretraining-scale data: exact positions, disjoint shards per reader.

Large data comes in shards (webdataset tars, parquet files or row groups, Hugging Face
datasets). A :class:`ShardedSource` counts the records of every shard when it is built (tar
headers, parquet metadata: no payload is read) and numbers them: position ``p`` is record
``p - start(s)`` of the shard ``s`` whose range holds ``p``. Everything downstream speaks
positions, so the trainer's contract holds unchanged: **every sample read is a pure function of
the step**, and a resumed run (same world size and ``data.num_workers``) continues with exactly
the samples it would have read.

**Reading order** (:class:`ShardOrder`, :class:`ShardStepSampler`). There are ``R = world_size *
max(1, data.num_workers)`` *readers*, one per DDP rank and DataLoader worker. In epoch ``e`` the
shards are permuted by a generator seeded with ``(seed, e)`` and reader ``k`` reads shards
``perm_e[k], perm_e[k + R], ...``, each front to back. Readers never share a shard within an epoch,
and the union of their epoch-``e`` reads is the dataset exactly once; each reader goes on to its
next epoch on its own (shards differ in size). A DataLoader fetches micro-batch ``b`` of a rank
with worker ``b mod W`` (``W`` workers), so micro-batch ``b`` of rank ``r`` holds the next
``micro_batch`` positions of reader ``r * W + (b mod W)``: each worker reads its own shards
sequentially, which is what makes tar and parquet reading fast. Records keep their order inside
a shard (writers shuffle when they shard: webdataset's and ``datasets``' writers do).

A source is still a map-style dataset: ``source[p]`` reads any position (the tokenizer samples
a few thousand, a :class:`~minivlm.data.mixture.Mixture` draws at random), reopening or seeking
only when ``p`` is not the next record of the shard this process read last.

Bad records are skipped and counted like the data files' (:mod:`minivlm.data.file_dataset`):
``source[p]`` of a bad record returns the next loadable one, ``strict=True`` raises.
"""

from __future__ import annotations

import bisect
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from minivlm.data.media import MediaRoot
from minivlm.data.sample import DataError, sample_from_messages
from minivlm.data.skips import SkippingReader
from minivlm.text.chat import Message


# Keeps the shard permutations apart from anything else seeded with the same seed.
_SHARD_STREAM = 0x73686172


@dataclass(frozen=True)
class Shard:
    """One shard: where it is (for messages and for its reader) and how many records it holds."""

    name: str
    size: int


class ShardedSource(SkippingReader, Dataset, ABC):
    """Records in shards, numbered by position (module docstring). Subclasses read one shard
    sequentially from an offset (:meth:`_read_shard`) and turn a raw record into checked
    messages (:meth:`_messages`).

    Args:
        shards: the shards in a fixed order (sorted names), each with its record count.
        strict: the first bad record raises :class:`DataError` instead of being skipped.
        require_assistant: a record needs an assistant turn (training data).
        max_pixels: per image decompression-bomb limit.
    """

    task = "shards"

    def __init__(self, shards: Sequence[Shard], *, strict: bool = False, require_assistant: bool = True,
                 max_pixels: int | None = None) -> None:
        self.shards = [s for s in shards if s.size > 0]
        if not self.shards:
            raise DataError("no records in any shard", reason="no_records",
                            source=", ".join(s.name for s in shards[:3]) or "(no shards)")
        self.starts = np.concatenate([[0], np.cumsum([s.size for s in self.shards])]).astype(np.int64)
        self.require_assistant = require_assistant
        self.media = MediaRoot(None, max_pixels)
        self._init_skips(strict)
        self._cursor: tuple[int, int, int, Iterator[Any]] | None = None  # (pid, shard, next offset, records)

    # ---- format-specific parts -----------------------------------------------------------------
    @abstractmethod
    def _read_shard(self, shard: int, offset: int) -> Iterator[Any]:
        """Raw records of shard ``shard`` from record ``offset`` on, in order."""

    @abstractmethod
    def _messages(self, raw: Any, source: str) -> tuple[list[Message], dict[str, Any]]:
        """A raw record -> (checked messages with media bound, sample metadata), or DataError."""

    # ---- positions -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, position: int) -> tuple[int, int]:
        """``(shard index, record offset in the shard)`` of ``position``."""
        position = range(len(self))[position]
        shard = int(np.searchsorted(self.starts, position, side="right")) - 1
        return shard, position - int(self.starts[shard])

    def order(self, readers: int, seed: int | None = 0) -> ShardOrder:
        """The reading order for ``readers`` readers (see :class:`ShardOrder`)."""
        return ShardOrder([s.size for s in self.shards], readers, seed, self.starts)

    # ---- reading -------------------------------------------------------------------------------
    def __getitem__(self, position: int) -> dict[str, Any]:
        """The sample at ``position``; if that record is bad (and not strict), the next loadable."""
        return self._first_loadable(position, len(self), self.shards[0].name)

    def raw(self, position: int) -> Any:
        """The raw record at ``position`` (sequential reads continue the open shard)."""
        shard, offset = self.locate(position)
        # A forked DataLoader worker inherits the parent's open shard, whose file offset the two
        # processes would share: it opens its own.
        if self._cursor is None or self._cursor[:3] != (os.getpid(), shard, offset):
            self._cursor = (os.getpid(), shard, offset, self._read_shard(shard, offset))
        records = self._cursor[3]
        try:
            record = next(records)
        except StopIteration:
            raise DataError(f"shard holds fewer than the {self.shards[shard].size} records counted when indexed",
                            reason="truncated_shard", source=self.shards[shard].name) from None
        self._cursor = (os.getpid(), shard, offset + 1, records)
        return record

    def summary(self) -> str:
        return f"{len(self.shards)} shards, {len(self)} records, {self._skip_text()}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cursor": None}  # each DataLoader worker opens its own shards

    # ---- helpers -------------------------------------------------------------------------------
    def _load_position(self, position: int) -> dict[str, Any]:
        shard, offset = self.locate(position)
        source = f"{self.shards[shard].name}#{offset}"
        messages, metadata = self._messages(self.raw(position), source)
        messages = self.media.load(self.media.resolve(messages, source), source)  # resolve: refuses paths
        return sample_from_messages(messages, **{"task": self.task, "id": source, **metadata})


class ShardOrder:
    """Which positions each reader reads, epoch after epoch (module docstring).

    Args:
        sizes: records per shard, in shard order.
        readers: how many readers share the shards (ranks x DataLoader workers).
        seed: seeds the per-epoch shard permutations; None keeps the shard order.
        starts: ``[n_shards + 1]`` first position of each shard (and the total).
    """

    def __init__(self, sizes: Sequence[int], readers: int, seed: int | None, starts: np.ndarray) -> None:
        if readers < 1:
            raise ValueError(f"readers must be >= 1; got {readers}")
        if len(sizes) < readers:
            raise ValueError(f"{len(sizes)} shards cannot give each of {readers} readers (DDP ranks x DataLoader "
                             f"workers) shards of its own: write at least {readers} shards, or use fewer "
                             f"data.num_workers")
        self.sizes, self.readers, self.seed, self.starts = np.asarray(sizes, np.int64), readers, seed, starts
        self._epoch_bounds: dict[int, list[int]] = {}  # reader -> [first reader-offset of each epoch]
        self._permutations: dict[int, np.ndarray] = {}

    def shards_of(self, reader: int, epoch: int) -> np.ndarray:
        """The shards ``reader`` reads in ``epoch``, in reading order."""
        return self._permutation(epoch)[reader::self.readers]

    def positions(self, reader: int, first: int, count: int) -> list[int]:
        """The dataset positions at offsets ``first .. first + count`` of ``reader``'s stream."""
        out = []
        for offset in range(first, first + count):
            epoch, within = self._epoch_of(reader, offset)
            shards = self.shards_of(reader, epoch)
            ends = np.cumsum(self.sizes[shards])
            k = int(np.searchsorted(ends, within, side="right"))
            out.append(int(self.starts[shards[k]]) + within - (int(ends[k - 1]) if k else 0))
        return out

    def _epoch_of(self, reader: int, offset: int) -> tuple[int, int]:
        bounds = self._epoch_bounds.setdefault(reader, [0])
        while bounds[-1] <= offset:
            bounds.append(bounds[-1] + int(self.sizes[self.shards_of(reader, len(bounds) - 1)].sum()))
        epoch = bisect.bisect_right(bounds, offset) - 1
        return epoch, offset - bounds[epoch]

    def _permutation(self, epoch: int) -> np.ndarray:
        if self.seed is None:
            return np.arange(len(self.sizes))
        if epoch not in self._permutations:
            if len(self._permutations) > 64:  # readers drift apart by a few epochs at most
                self._permutations.clear()
            generator = np.random.default_rng([_SHARD_STREAM, self.seed, epoch])
            self._permutations[epoch] = generator.permutation(len(self.sizes))
        return self._permutations[epoch]


class ShardStepSampler:
    """Dataset positions of every micro-batch of one rank, step by step (module docstring): the
    step-sampler protocol of :mod:`minivlm.train.data` (``indices(step, micro)``, ``start``,
    ``total``, ``accum``) for a :class:`ShardedSource`.

    Args:
        order: the source's :meth:`ShardedSource.order` for ``world_size * workers`` readers.
        micro_batch, grad_accum, world_size, rank: as :class:`~minivlm.train.data.StepBatchSampler`.
        workers: DataLoader workers per rank (0 counts as 1: the main process reads).
        start_step, total_steps: the steps to yield (None: endless).
    """

    def __init__(self, order: ShardOrder, micro_batch: int, grad_accum: int, world_size: int = 1, rank: int = 0,
                 workers: int = 0, start_step: int = 0, total_steps: int | None = None) -> None:
        self.workers = max(1, workers)
        if order.readers != world_size * self.workers:
            raise ValueError(f"the order has {order.readers} readers but {world_size} ranks x {self.workers} "
                             f"workers read it")
        self.order = order
        self.mb, self.accum, self.world, self.rank = micro_batch, grad_accum, world_size, rank
        self.start, self.total = start_step, total_steps

    def reader_of(self, step: int, micro: int) -> int:
        """The reader (rank x worker) whose shards micro-batch ``micro`` of ``step`` comes from."""
        return self.rank * self.workers + (step * self.accum + micro) % self.workers

    def indices(self, step: int, micro: int) -> list[int]:
        batch = step * self.accum + micro  # this rank's micro-batches so far
        served = batch // self.workers  # ... that the same worker fetched before this one
        return self.order.positions(self.reader_of(step, micro), served * self.mb, self.mb)
