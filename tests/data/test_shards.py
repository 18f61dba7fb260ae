"""The reading order of sharded sources: readers (ranks x workers) never share a shard in an
epoch, each epoch reads the dataset exactly once, and every position is a pure function of the
step, so a resumed sampler continues exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.data.shards import ShardOrder, ShardStepSampler


def order(sizes: list[int], readers: int, seed: int | None = 0) -> ShardOrder:
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return ShardOrder(sizes, readers, seed, starts)


def shard_of(sizes: list[int], position: int) -> int:
    return int(np.searchsorted(np.cumsum(sizes), position, side="right"))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), readers=st.integers(1, 4), seed=st.one_of(st.none(), st.integers(0, 3)))
def test_each_epoch_reads_every_record_once_and_readers_never_share_a_shard(data, readers, seed):
    sizes = data.draw(st.lists(st.integers(1, 6), min_size=readers, max_size=readers + 5))
    plan = order(sizes, readers, seed)
    for epoch in (0, 1, 2):
        read, shards_by_reader = [], []
        for reader in range(readers):
            # the reader's stream offsets of this epoch: after its earlier epochs' records
            before = sum(sum(sizes[s] for s in plan.shards_of(reader, e)) for e in range(epoch))
            length = sum(sizes[s] for s in plan.shards_of(reader, epoch))
            positions = plan.positions(reader, before, length)
            read += positions
            shards_by_reader.append({shard_of(sizes, p) for p in positions})
            assert positions == sorted(positions, key=lambda p: list(plan.shards_of(reader, epoch)).index(
                shard_of(sizes, p)))  # shard after shard, each front to back
        assert sorted(read) == list(range(sum(sizes)))  # exactly once per epoch
        assert sum(len(s) for s in shards_by_reader) == len(set().union(*shards_by_reader))  # disjoint


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=4, max_size=9), first=st.integers(0, 40),
       count=st.integers(1, 12))
def test_a_stream_slice_is_the_same_however_it_is_asked_for(sizes, first, count):
    plan, fresh = order(sizes, 2), order(sizes, 2)
    assert plan.positions(1, first, count) == [fresh.positions(1, first + i, 1)[0] for i in range(count)]


def test_shard_order_changes_with_the_epoch_and_the_seed():
    plan = order([3] * 8, 2, seed=0)
    assert list(plan.shards_of(0, 0)) != list(plan.shards_of(0, 1))
    assert list(order([3] * 8, 2, seed=None).shards_of(1, 5)) == [1, 3, 5, 7]


def test_too_few_shards_for_the_readers_is_an_error():
    with pytest.raises(ValueError, match="3 shards cannot give each of 4 readers"):
        order([5, 5, 5], 4)


@pytest.mark.parametrize(("world_size", "workers"), [(1, 0), (1, 3), (2, 2)])
def test_step_sampler_resumes_exactly_and_each_micro_batch_comes_from_its_worker_s_shards(world_size, workers):
    sizes = [5, 7, 4, 6, 9, 3, 8, 5]
    readers = world_size * max(1, workers)
    for rank in range(world_size):
        def sampler(start):
            return ShardStepSampler(order(sizes, readers), 3, 2, world_size, rank, workers, start_step=start)

        full, resumed = sampler(0), sampler(7)
        for step in range(7, 15):
            for micro in range(2):
                assert resumed.indices(step, micro) == full.indices(step, micro)
        for step in range(15):
            for micro in range(2):
                reader = full.reader_of(step, micro)
                assert reader // max(1, workers) == rank
                assert reader % max(1, workers) == (step * 2 + micro) % max(1, workers)


def test_sampler_refuses_an_order_for_other_readers():
    with pytest.raises(ValueError, match="2 readers but 1 ranks x 3 workers"):
        ShardStepSampler(order([2] * 4, 2), 1, 1, 1, 0, workers=3)
