"""The data position is the step: sample indices are a pure function of (step, micro, rank)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.train.data import Skipped, StepBatchSampler, TrainCollator, supervised_tokens

shapes = st.tuples(st.integers(1, 50), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
                   st.one_of(st.none(), st.integers(0, 5)))


def _step_samples(n, mb, accum, world, seed, step) -> list[int]:
    """Every index read in ``step``, in data-position order, gathered over ranks and micro-batches."""
    per_rank = [StepBatchSampler(n, mb, accum, world, rank, seed=seed) for rank in range(world)]
    return [i for micro in range(accum) for rank in range(world) for i in per_rank[rank].indices(step, micro)]


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 6))
def test_a_step_reads_the_same_samples_on_any_number_of_ranks(shape, step):
    n, mb, accum, world, seed = shape
    # The same global batch split as world x accum, or all on one rank with world x accum micro-batches.
    assert _step_samples(n, mb, accum, world, seed, step) == _step_samples(n, mb, accum * world, 1, seed, step)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 5), st.integers(1, 5))
def test_a_resumed_sampler_continues_where_the_full_one_was(shape, start, more):
    n, mb, accum, world, seed = shape
    for rank in range(world):
        full = list(StepBatchSampler(n, mb, accum, world, rank, total_steps=start + more, seed=seed))
        resumed = list(StepBatchSampler(n, mb, accum, world, rank, start_step=start, total_steps=start + more,
                                        seed=seed))
        assert resumed == full[start * accum:]
        assert len(resumed) == more * accum


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(0, 3), st.integers(0, 3))
def test_every_epoch_is_a_permutation_and_epochs_differ(n, seed, epoch):
    sampler = StepBatchSampler(n, 1, 1, seed=seed)
    order = [sampler.sample_at(epoch * n + i) for i in range(n)]
    assert sorted(order) == list(range(n))
    if n >= 8:
        assert order != [sampler.sample_at((epoch + 1) * n + i) for i in range(n)]


def test_without_a_seed_the_dataset_is_read_in_order():
    sampler = StepBatchSampler(10, 2, 2, world_size=2, rank=1, seed=None)
    assert sampler.indices(0, 0) == [2, 3] and sampler.indices(0, 1) == [6, 7] and sampler.indices(1, 0) == [0, 1]


def test_an_endless_sampler_has_no_length():
    sampler = StepBatchSampler(10, 2, 1, total_steps=None)
    assert len(list(itertools.islice(sampler, 7))) == 7
    with pytest.raises(TypeError, match="endless"):
        len(sampler)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_samples": 0}, "n_samples must be an integer >= 1"),
    ({"micro_batch": 0}, "micro_batch must be an integer >= 1"),
    ({"grad_accum": 2.0}, "grad_accum must be an integer >= 1"),
    ({"rank": 2}, r"rank must lie in \[0, 2\)"),
    ({"start_step": 5, "total_steps": 3}, "total_steps .3. is before start_step .5."),
])
def test_bad_sampler_arguments_raise(kwargs, message):
    arguments = {"n_samples": 10, "micro_batch": 2, "grad_accum": 1, "world_size": 2, "rank": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        StepBatchSampler(**arguments)


def test_supervised_tokens_counts_labels_after_the_shift():
    labels = torch.tensor([[5, 6, -100, 7], [-100, -100, 8, -100]])
    assert supervised_tokens({"labels": labels}) == 3  # the first column predicts nothing
    assert supervised_tokens({}) == 0


def test_the_collator_reports_an_all_skipped_micro_batch_as_empty():
    batch = TrainCollator(pad_id=0)([Skipped("too long"), Skipped("too long")])
    assert batch["n_samples"] == 0 and batch["skipped"] == {"too long": 2} and "input_ids" not in batch
