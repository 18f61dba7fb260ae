"""The training data stream: deterministic sample indices -> rendered, collated micro-batches.

Every sample index is a pure function of (step, micro-batch, rank), so the data position is
just the step number: a resumed run, or the same run on another number of ranks with the same
global batch, reads exactly the same samples.

Global step ``s`` consumes data positions ``[s * G, (s + 1) * G)`` with
``G = micro_batch * grad_accum * world_size``; rank ``r``'s micro-batch ``m`` takes the slice
starting at ``s * G + (m * world_size + r) * micro_batch``. Position ``p`` reads sample
``perm_e[p mod n]`` of epoch ``e = p // n``, where ``perm_e`` is a permutation seeded by
``(seed, e)`` (identity when shuffling is off): every epoch visits each sample once, in a new
order, without the sampler holding any state but the step.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from minivlm.data.collate import Packer, merge_shared_prefix, pad_collate
from minivlm.data.shards import ShardedSource, ShardStepSampler
from minivlm.text.processor import MediaCache, Processor, SampleSkipped
from minivlm.train.loss_weighting import sample_loss_weight

log = logging.getLogger(__name__)

# Keeps the sampler's permutation stream apart from anything else seeded with the same seed.
_EPOCH_STREAM = 0x65706F63


@dataclass
class Skipped:
    """Stands in for a sample the processor refused, so the count survives worker processes."""

    reason: str


@dataclass
class RenderedGroup:
    """The rendered samples of one grouped dataset item (several questions about the same
    images), merged into one shared-prefix sample by the collator; ``skipped`` lists the reasons
    for members the processor refused."""

    samples: list[Any]
    skipped: list[str]


class RenderedDataset(Dataset):
    """Sample ``i`` of ``dataset`` rendered for training (or :class:`Skipped`).

    A dataset item that is a *list* of samples (e.g. ``easy_vqa_grouped``: every question about one
    image) becomes a :class:`RenderedGroup`, trained as one shared-prefix sample
    (:func:`minivlm.data.collate.merge_shared_prefix`).
    """

    def __init__(self, dataset: Dataset, processor: Processor):
        self.dataset, self.processor = dataset, processor

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, list):
            # The members show the same image objects: preprocess each once for the whole group.
            cache = MediaCache()
            rendered = [self._render(sample, cache) for sample in item]
            return RenderedGroup([r for r in rendered if not isinstance(r, Skipped)],
                                 [r.reason for r in rendered if isinstance(r, Skipped)])
        return self._render(item)

    def _render(self, sample: dict[str, Any], media_cache: MediaCache | None = None) -> Any:
        try:
            return self.processor.render(sample["messages"], for_training=True, media_cache=media_cache)
        except SampleSkipped as err:
            return Skipped(err.reason)


class StepSampler(Sampler[list[int]], ABC):
    """Yields ``indices(step, micro)`` for every micro-batch of every step in ``[start, total)``;
    subclasses define ``indices`` and set ``start``, ``total`` (None: endless) and ``accum``."""

    start: int
    total: int | None
    accum: int

    @abstractmethod
    def indices(self, step: int, micro: int) -> list[int]:
        """Dataset indices of micro-batch ``micro`` of step ``step``."""

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while self.total is None or step < self.total:
            for micro in range(self.accum):
                yield self.indices(step, micro)
            step += 1

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("an endless sampler has no length")
        return (self.total - self.start) * self.accum


class StepBatchSampler(StepSampler):
    """Index lists for every micro-batch of this rank, from ``start_step`` on (see module docstring).

    Args:
        n_samples: dataset length.
        micro_batch: samples per micro-batch and rank.
        grad_accum: micro-batches per step and rank.
        world_size, rank: the data-parallel group.
        start_step: first step to yield (the resumed data position).
        total_steps: stop before this step; None for an endless stream.
        seed: seeds the per-epoch permutations; None reads the dataset in order.
    """

    def __init__(self, n_samples: int, micro_batch: int, grad_accum: int, world_size: int = 1, rank: int = 0,
                 start_step: int = 0, total_steps: int | None = None, seed: int | None = 0):
        for name, value, least in (("n_samples", n_samples, 1), ("micro_batch", micro_batch, 1),
                                   ("grad_accum", grad_accum, 1), ("world_size", world_size, 1),
                                   ("start_step", start_step, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"StepBatchSampler.{name} must be an integer >= {least}; got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"StepBatchSampler.rank must lie in [0, {world_size}); got {rank!r}")
        if total_steps is not None and total_steps < start_step:
            raise ValueError(f"StepBatchSampler.total_steps ({total_steps}) is before start_step ({start_step})")
        self.n, self.mb, self.accum, self.world, self.rank = n_samples, micro_batch, grad_accum, world_size, rank
        self.start, self.total, self.seed = start_step, total_steps, seed
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.mb * self.accum * self.world

    def sample_at(self, position: int) -> int:
        """The dataset index read at data position ``position``."""
        epoch, offset = divmod(position, self.n)
        if self.seed is None:
            return offset
        return int(self._permutation(epoch)[offset])

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            # A step straddles at most two epochs: keep only the newest permutation besides this one.
            for old in sorted(self._permutations)[:-1]:
                del self._permutations[old]
            self._permutations[epoch] = np.random.default_rng([_EPOCH_STREAM, self.seed, epoch]).permutation(self.n)
        return self._permutations[epoch]

    def indices(self, step: int, micro: int) -> list[int]:
        base = step * self.global_batch + (micro * self.world + self.rank) * self.mb
        return [self.sample_at(base + j) for j in range(self.mb)]

class CurriculumSampler(StepSampler):
    """:class:`StepBatchSampler` streams one after the other: stream ``k`` is read from step
    ``switch_steps[k - 1]`` (0 for the first) until ``switch_steps[k]``, the last one to the end,
    its indices offset by ``offsets[k]`` (where its dataset starts in a ``ConcatDataset``).

    Each stream counts its own steps from 0 at its switch, so it starts at the beginning of its
    first epoch; like the plain sampler, every index is a pure function of the step, so a run
    resumed at any step, before or after a switch, reads the same samples.
    """

    def __init__(self, streams: Sequence[StepBatchSampler], switch_steps: Sequence[int], offsets: Sequence[int],
                 start_step: int = 0, total_steps: int | None = None):
        if len(streams) < 2 or len(switch_steps) != len(streams) - 1 or len(offsets) != len(streams):
            raise ValueError(f"a curriculum needs >= 2 streams, one switch step fewer and one offset each; got "
                             f"{len(streams)} streams, {len(switch_steps)} switch steps, {len(offsets)} offsets")
        if switch_steps[0] < 1 or any(b <= a for a, b in zip(switch_steps, switch_steps[1:])):
            raise ValueError(f"CurriculumSampler.switch_steps must be increasing and >= 1; got {list(switch_steps)}")
        layouts = {(s.mb, s.accum, s.world, s.rank) for s in streams}
        if len(layouts) > 1:
            raise ValueError("the streams of a curriculum must have the same micro-batch, accumulation and ranks")
        self.streams, self.switches, self.offsets = list(streams), list(switch_steps), list(offsets)
        self.start, self.total = start_step, total_steps
        self.accum = streams[0].accum

    def indices(self, step: int, micro: int) -> list[int]:
        phase = bisect.bisect_right(self.switches, step)
        begin = self.switches[phase - 1] if phase else 0
        return [self.offsets[phase] + i for i in self.streams[phase].indices(step - begin, micro)]

# ---- streaming hook: sharded sources bring their own reading order --------------------------------
class ShardSampler(StepSampler):
    """The step sampler of a sharded source (:mod:`minivlm.data.shards`): each (rank, DataLoader
    worker) reads shards of its own, front to back, and every index is still a pure function of
    the step (the same world size and ``workers`` resume exactly)."""

    def __init__(self, source: ShardedSource, micro_batch: int, grad_accum: int, world_size: int = 1, rank: int = 0,
                 workers: int = 0, start_step: int = 0, total_steps: int | None = None, seed: int | None = 0):
        order = source.order(world_size * max(1, workers), seed)
        self.shards = ShardStepSampler(order, micro_batch, grad_accum, world_size, rank, workers, start_step, total_steps)
        self.mb, self.accum, self.world, self.rank = micro_batch, grad_accum, world_size, rank
        self.start, self.total = start_step, total_steps

    def indices(self, step: int, micro: int) -> list[int]:
        return self.shards.indices(step, micro)


def step_sampler(dataset: Dataset, micro_batch: int, grad_accum: int, world_size: int = 1, rank: int = 0, *,
                 workers: int = 0, start_step: int = 0, total_steps: int | None = None,
                 seed: int | None = 0) -> StepSampler:
    """The step sampler that reads ``dataset``: :class:`ShardSampler` for a sharded source,
    :class:`StepBatchSampler` (global per-epoch permutations) for everything else."""
    if isinstance(dataset, ShardedSource):
        return ShardSampler(dataset, micro_batch, grad_accum, world_size, rank, workers, start_step, total_steps, seed)
    return StepBatchSampler(len(dataset), micro_batch, grad_accum, world_size, rank, start_step, total_steps, seed)


class TrainCollator:
    """Drops skipped samples (counting why), weights their tokens (``loss_weighting``, see
    :mod:`minivlm.train.loss_weighting`; a group is one sample), merges groups into shared-prefix
    samples, then pads or packs.

    The returned dict holds the model inputs plus ``skipped`` (a Counter of reasons) and
    ``n_samples`` (samples kept, each member of a group counted; 0 means the micro-batch is
    empty and has no model inputs).
    """

    def __init__(self, pad_id: int, pack_length: int | None = None, image_token_id: int | None = None,
                 loss_weighting: str = "token"):
        sample_loss_weight(1, loss_weighting)  # rejects an unknown weighting before any batch
        self.pad_id = pad_id
        self.pack_length = pack_length
        self.image_token_id = image_token_id
        self.loss_weighting = loss_weighting
        self.packer = Packer(pack_length, pad_id) if pack_length else None

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        skipped: Counter = Counter()
        samples: list[Any] = []
        n_samples = 0
        for item in items:
            if isinstance(item, Skipped):
                skipped[item.reason] += 1
            elif isinstance(item, RenderedGroup):
                skipped.update(item.skipped)
                samples.extend(self._merge(self._weighted(item.samples)))
                n_samples += len(item.samples)
            else:
                samples.extend(self._weighted([item]))
                n_samples += 1
        batch: dict[str, Any] = {}
        if samples:
            batch = self.packer(samples) if self.packer else pad_collate(samples, self.pad_id)
        batch["skipped"] = skipped
        batch["n_samples"] = n_samples
        return batch

    def _weighted(self, members: list[Any]) -> list[Any]:
        """``members`` (one sample, or a group's) with every token weighted by their total count."""
        if self.loss_weighting == "token":
            return members  # no weights: the plain token mean, and no extra tensor
        weight = sample_loss_weight(sum(m.n_supervised for m in members), self.loss_weighting)
        return [dataclasses.replace(m, loss_weights=[weight] * len(m)) for m in members]

    def _merge(self, members: list[Any]) -> list[Any]:
        """One shared-prefix sample for a group's members, split into as few as fit ``pack_length``."""
        if not members:
            return []
        if self.image_token_id is None:
            raise ValueError("grouped dataset items need TrainCollator(image_token_id=...) to merge them")
        merged = merge_shared_prefix(members, self.image_token_id)
        if not self.pack_length or len(merged["input_ids"]) <= self.pack_length:
            return [merged]
        # Plan the split with the whole group's prefix: any subset shares at least that much.
        prefix = merged["branch_ids"].count(0)
        parts, current, length = [], [], prefix
        for sample in members:
            branch = len(sample) - prefix
            if current and length + branch > self.pack_length:
                parts.append(current)
                current, length = [], prefix
            current.append(sample)
            length += branch
        parts.append(current)
        return [merge_shared_prefix(part, self.image_token_id) for part in parts]


def make_loader(dataset: Dataset, processor: Processor, sampler: StepBatchSampler, *, packing: bool,
                max_length: int, num_workers: int = 0, seed: int = 0, loss_weighting: str = "token") -> DataLoader:
    """A loader over ``sampler``'s micro-batches.

    The loader gets its own generator, seeded by ``(seed, start step)``: without one, creating
    its iterator draws the worker base seed from the *global* torch RNG, so a run resumed at
    step ``k`` would leave the global stream (dropout, augmentation) one draw off the
    uninterrupted run.
    """
    collate = TrainCollator(processor.tokenizer.pad_id, max_length if packing else None,
                            processor.tokenizer.image_token_id, loss_weighting)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + sampler.start)
    return DataLoader(RenderedDataset(dataset, processor), batch_sampler=sampler, collate_fn=collate,
                      num_workers=num_workers, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None, generator=generator)


def supervised_tokens(batch: dict[str, Any]) -> int:
    """Tokens that carry a loss after the one-position shift (as the model counts them)."""
    labels = batch.get("labels")
    return 0 if labels is None else int((labels[:, 1:] != -100).sum())


def supervised_weight(batch: dict[str, Any], n_tokens: int | None = None) -> float:
    """The loss's normaliser for this batch: the total ``loss_weights`` of its supervised tokens
    (as the model sums them), or their number when the batch carries no weights (``n_tokens``
    when the caller has counted them already: counting is a device reduction and a host sync)."""
    weights, labels = batch.get("loss_weights"), batch.get("labels")
    if weights is None or labels is None:
        return float(supervised_tokens(batch) if n_tokens is None else n_tokens)
    return float(weights[:, 1:][labels[:, 1:] != -100].double().sum())


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
