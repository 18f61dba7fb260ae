"""Mixture: seeded, proportional, without replacement within a pass, same in DataLoader workers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from minivlm.data.mixture import Mixture
from minivlm.data.shapes import ShapesDataset
from minivlm.data.video import VideoDataset


class Numbers(Dataset):
    """Item i is (name, i): shows exactly which source item a mixture sample came from."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.name, range(self.size)[index]


def test_proportions_follow_the_weights():
    sources = {"a": Numbers("a", 100), "b": Numbers("b", 100), "c": Numbers("c", 100)}
    mixture = Mixture(sources, {"a": 5, "b": 3, "c": 2}, length=20_000, seed=0)
    counts = mixture.counts()
    assert sum(counts.values()) == 20_000
    for name, p in zip("abc", (0.5, 0.3, 0.2)):
        sigma = np.sqrt(20_000 * p * (1 - p))
        assert abs(counts[name] - 20_000 * p) < 4 * sigma, counts
    # counts() agrees with what the samples actually are
    assert Counter(mixture[i][0] for i in range(20_000)) == counts


def test_same_seed_same_order_other_seed_other_order():
    sources = {"a": Numbers("a", 50), "b": Numbers("b", 70)}
    first = [Mixture(sources, length=300, seed=1)[i] for i in range(300)]
    again = [Mixture(sources, length=300, seed=1)[i] for i in range(300)]
    other = [Mixture(sources, length=300, seed=2)[i] for i in range(300)]
    assert first == again and first != other


def test_each_pass_over_a_source_visits_every_item_once_in_a_new_order():
    mixture = Mixture(
        {"small": Numbers("small", 10), "big": Numbers("big", 10_000)},
        {"small": 1, "big": 1},
        length=2_000,
    )
    small = [index for name, index in (mixture[i] for i in range(2_000)) if name == "small"]
    passes = [small[k : k + 10] for k in range(0, len(small) - 9, 10)]
    assert len(passes) > 50
    assert all(sorted(p) == list(range(10)) for p in passes)
    assert len({tuple(p) for p in passes}) > 40  # reshuffled per pass, not one fixed order


def test_locate_names_the_source_and_index():
    mixture = Mixture({"a": Numbers("a", 5), "b": Numbers("b", 5)}, length=40, seed=3)
    for i in range(-40, 40):
        assert mixture[i] == mixture.locate(i)
    with pytest.raises(IndexError):
        mixture[40]


def test_default_length_is_the_sum_and_summary_reports_counts():
    mixture = Mixture({"a": Numbers("a", 30), "b": Numbers("b", 10)})
    assert len(mixture) == 40
    assert mixture.summary().startswith("mixture of 40 samples: a ")
    assert np.allclose(mixture.probabilities, [0.5, 0.5])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"a": 0, "b": 1}, "> 0"),
        ({"a": -1, "b": 1}, "> 0"),
        ({"a": float("nan"), "b": 1}, "finite"),
        ({"a": float("inf"), "b": 1}, "finite"),
        ({"a": "1", "b": 1}, "positive number"),
        ({"a": True, "b": 1}, "positive number"),
        ({"a": 1}, "exactly the sources"),
        ({"a": 1, "b": 1, "c": 1}, "exactly the sources"),
    ],
)
def test_invalid_weights_are_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        Mixture({"a": Numbers("a", 3), "b": Numbers("b", 3)}, weights)


def test_invalid_sources_and_lengths_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        Mixture({})
    with pytest.raises(ValueError, match="empty"):
        Mixture({"a": Numbers("a", 0)})
    with pytest.raises(ValueError, match="length"):
        Mixture({"a": Numbers("a", 3)}, length=0)


@settings(max_examples=25, deadline=None)
@given(weights=st.lists(st.floats(0.01, 100), min_size=1, max_size=5), seed=st.integers(0, 2**31))
def test_probabilities_are_the_normalised_weights(weights, seed):
    names = [f"s{i}" for i in range(len(weights))]
    mixture = Mixture(
        {n: Numbers(n, 7) for n in names}, dict(zip(names, weights)), length=100, seed=seed
    )
    assert np.allclose(mixture.probabilities, np.array(weights) / sum(weights))
    assert all(0 <= mixture.locate(i)[1] < 7 for i in range(100))


def _keep_batch(batch):
    return batch


def test_dataloader_with_two_workers_matches_one_process():
    mixture = Mixture(
        {"shapes": ShapesDataset(split="test"), "video": VideoDataset(split="test", n_frames=2)},
        {"shapes": 0.7, "video": 0.3},
        length=32,
        seed=4,
    )
    single = [
        s for batch in DataLoader(mixture, batch_size=4, collate_fn=_keep_batch) for s in batch
    ]
    parallel = [
        s
        for batch in DataLoader(mixture, batch_size=4, num_workers=2, collate_fn=_keep_batch)
        for s in batch
    ]
    assert [s["id"] for s in parallel] == [s["id"] for s in single]
    assert {s["task"] for s in single} == {"shapes", "video"}
