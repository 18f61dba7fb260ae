"""Collation: padding (right for training, left for generation) and first-fit-decreasing packing."""

from __future__ import annotations

import pickle
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.data.collate import IGNORE_INDEX, Packer, merge_shared_prefix, pack_collate, pad_collate, plan_packing

PAD = 0
X = IGNORE_INDEX


def views(*values: float) -> torch.Tensor:
    """``[n, 3, 2, 2]`` views, view ``i`` filled with ``values[i]`` so its order is visible."""
    return torch.stack([torch.full((3, 2, 2), float(v)) for v in values]) if values else torch.empty(0, 3, 2, 2)


def sample(ids, labels, *view_values):
    return {"input_ids": list(ids), "labels": list(labels), "pixel_values": views(*view_values)}


# ---- padding ------------------------------------------------------------------------------------
def test_right_padding_exact():
    batch = pad_collate([sample([5, 6, 7], [X, 6, 7], 1.0), sample([8, 9], [8, 9], 2.0, 3.0)], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, PAD]]
    # The first label of each row is dropped: nothing before it predicts it.
    assert batch["labels"].tolist() == [[X, 6, 7], [X, 9, X]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.bool


def test_left_padding_exact():
    batch = pad_collate([sample([5, 6, 7], [X] * 3), sample([8, 9], [8, 9])], pad_id=PAD, padding_side="left")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [PAD, 8, 9]]
    # Without the reset, the pad column would be trained to predict token 8.
    assert batch["labels"].tolist() == [[X, X, X], [X, X, 9]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [False, True, True]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert batch["pixel_values"] is None


def test_pixel_values_none_when_no_sample_has_views():
    batch = pad_collate([{"input_ids": [1], "labels": [X], "pixel_values": None}, sample([2], [X])], pad_id=PAD)
    assert batch["pixel_values"] is None


def test_accepts_objects_tensors_and_missing_labels():
    obj = SimpleNamespace(input_ids=torch.tensor([4, 5]), labels=torch.tensor([X, 5]), pixel_values=views(7.0))
    batch = pad_collate([obj, {"input_ids": [1, 2, 3]}], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[4, 5, PAD], [1, 2, 3]]
    assert batch["labels"].tolist() == [[X, 5, X], [X, X, X]]
    assert batch["pixel_values"].shape == (1, 3, 2, 2)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    side=st.sampled_from(["right", "left"]),
    data=st.data(),
)
def test_padding_is_lossless(lengths, side, data):
    samples = []
    for n in lengths:
        ids = data.draw(st.lists(st.integers(1, 99), min_size=n, max_size=n))
        supervised = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
        samples.append(sample(ids, [i if s else X for i, s in zip(ids, supervised)]))
    batch = pad_collate(samples, pad_id=PAD, padding_side=side)
    assert batch["input_ids"].shape == (len(lengths), max(lengths))
    for row, s in enumerate(samples):
        mask = batch["attention_mask"][row]
        assert batch["input_ids"][row][mask].tolist() == s["input_ids"]
        assert batch["labels"][row][mask].tolist() == [X] + s["labels"][1:]
        assert batch["position_ids"][row][mask].tolist() == list(range(len(s["input_ids"])))
        assert (batch["input_ids"][row][~mask] == PAD).all() and (batch["labels"][row][~mask] == X).all()
        real = mask.nonzero().flatten()
        assert real.tolist() == list(range(real[0], real[0] + len(real)))  # contiguous
        assert (real[0] == 0) if side == "right" else (real[-1] == max(lengths) - 1)


@pytest.mark.parametrize(
    "samples, kwargs, match",
    [
        ([], {}, "at least one sample"),
        ([sample([1], [X])], {"padding_side": "top"}, "padding_side"),
        ([{"input_ids": []}], {}, "has no tokens"),
        ([{"labels": [1]}], {}, "has no input_ids"),
        ([{"input_ids": [1, 2], "labels": [1]}], {}, "2 input_ids but 1 labels"),
        ([{"input_ids": [1], "pixel_values": torch.zeros(3, 2, 2)}], {}, r"\[n_views, C, H, W\]"),
        (
            [
                {"input_ids": [1], "pixel_values": torch.zeros(1, 3, 2, 2)},
                {"input_ids": [1], "pixel_values": torch.zeros(1, 3, 4, 4)},
            ],
            {},
            "same",
        ),
    ],
)
def test_pad_collate_errors(samples, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pad_collate(samples, pad_id=PAD, **kwargs)


# ---- packing ------------------------------------------------------------------------------------
def test_first_fit_decreasing_plan():
    # Longest first: 5 -> row 0; 4 -> row 1; 3 -> row 0 (full); 3 -> row 1; 2 -> row 2; 1 -> row 1.
    assert plan_packing([5, 4, 3, 3, 2, 1], max_length=8) == [[0, 2], [1, 3, 5], [4]]
    assert plan_packing([2, 2, 2], max_length=2) == [[0], [1], [2]]


def test_plan_refuses_samples_longer_than_a_row():
    with pytest.raises(ValueError, match=r"\(1, 9\).*longer than max_length=8"):
        plan_packing([3, 9], max_length=8)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        plan_packing([1], max_length=0)


def test_pack_collate_exact():
    samples = [sample([1, 2], [1, 2], 10.0), sample([3, 4, 5], [X, 4, 5], 20.0, 21.0), sample([6], [6])]
    packed = pack_collate(samples, max_length=4, pad_id=PAD)
    # Plan: [3,4,5] (index 1) then [6] (index 2) in row 0; [1,2] (index 0) in row 1.
    assert packed["input_ids"].tolist() == [[3, 4, 5, 6], [1, 2, PAD, PAD]]
    assert packed["labels"].tolist() == [[X, 4, 5, X], [X, 2, X, X]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 0]]
    assert packed["document_ids"].tolist() == [[0, 0, 0, 1], [0, 0, -1, -1]]
    assert packed["attention_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert packed["pixel_values"][:, 0, 0, 0].tolist() == [20.0, 21.0, 10.0]
    assert packed["packing_efficiency"] == pytest.approx(6 / 8)


packable = st.integers(4, 24).flatmap(
    lambda max_length: st.tuples(
        st.just(max_length),
        st.lists(
            st.tuples(
                st.lists(st.tuples(st.integers(1, 99), st.booleans()), min_size=1, max_size=max_length),
                st.integers(0, 2),  # views per sample
            ),
            min_size=1,
            max_size=10,
        ),
    )
)


@settings(max_examples=50, deadline=None)
@given(spec=packable)
def test_packing_properties(spec):
    max_length, drawn = spec
    samples, n_views_total = [], 0
    for index, (tokens, n_views) in enumerate(drawn):
        # A unique first token (always unsupervised after packing) names the sample in its row.
        ids = [1000 + index] + [t for t, _ in tokens[1:]]
        labels = [X] + [t if supervised else X for t, supervised in tokens[1:]]
        samples.append(sample(ids, labels, *range(n_views_total, n_views_total + n_views)))
        n_views_total += n_views
    packed = pack_collate(samples, max_length=max_length, pad_id=PAD)
    ids, labels, docs, pos = packed["input_ids"], packed["labels"], packed["document_ids"], packed["position_ids"]
    real = packed["attention_mask"]
    n_rows = ids.shape[0]
    total = sum(len(s["input_ids"]) for s in samples)
    assert ids.shape == (n_rows, max_length)
    assert -(-total // max_length) <= n_rows <= len(samples)
    assert packed["packing_efficiency"] == pytest.approx(total / (n_rows * max_length))

    # No token lost or invented, labels unchanged.
    assert Counter(zip(ids[real].tolist(), labels[real].tolist())) == Counter(
        pair for s in samples for pair in zip(s["input_ids"], s["labels"])
    )
    assert (ids[~real] == PAD).all() and (labels[~real] == X).all() and (docs[~real] == -1).all()
    assert torch.equal(real, docs >= 0)

    # The loss scores logits[t] against labels[t + 1]: a supervised target never sits across a
    # document boundary from the position that predicts it.
    target_supervised = labels[:, 1:] != X
    assert (docs[:, :-1][target_supervised] == docs[:, 1:][target_supervised]).all()

    # Each document is one whole sample, ids count 0, 1, 2 along the row, positions restart at 0.
    seen, expected_views = [], []
    for row in range(n_rows):
        row_docs = docs[row][real[row]].tolist()
        assert row_docs == sorted(row_docs) and sorted(set(row_docs)) == list(range(max(row_docs) + 1))
        for doc in range(max(row_docs) + 1):
            where = docs[row] == doc
            index = int(ids[row][where][0]) - 1000
            assert ids[row][where].tolist() == samples[index]["input_ids"]
            assert pos[row][where].tolist() == list(range(len(samples[index]["input_ids"])))
            seen.append(index)
            expected_views.append(samples[index]["pixel_values"])
    assert sorted(seen) == list(range(len(samples)))

    # Views follow the packed placeholder order: rows top to bottom, documents left to right.
    if n_views_total:
        assert torch.equal(packed["pixel_values"], torch.cat(expected_views))
    else:
        assert packed["pixel_values"] is None


def test_packing_drops_the_label_of_each_document_start():
    # Plain-text samples supervised everywhere: the first token of the second document would
    # otherwise be predicted from the last token of the first.
    packed = pack_collate([sample([1, 2, 3], [1, 2, 3]), sample([4, 5], [4, 5])], max_length=5, pad_id=PAD)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert packed["labels"].tolist() == [[X, 2, 3, X, 5]]


def test_packer_is_a_picklable_collate_fn():
    packer = pickle.loads(pickle.dumps(Packer(max_length=4, pad_id=PAD)))
    samples = [sample([1, 2], [1, 2]), sample([3], [3])]
    assert torch.equal(packer(samples)["input_ids"], pack_collate(samples, 4, PAD)["input_ids"])
    with pytest.raises(ValueError, match="Packer.max_length must be >= 1"):
        Packer(max_length=0, pad_id=PAD)


def test_pack_collate_errors():
    with pytest.raises(ValueError, match="at least one sample"):
        pack_collate([], max_length=4, pad_id=PAD)
    with pytest.raises(ValueError, match="longer than max_length=2"):
        pack_collate([sample([1, 2, 3], [X] * 3)], max_length=2, pad_id=PAD)


def test_ignore_index_matches_the_chat_labels():
    from minivlm.text.chat import IGNORE_INDEX as CHAT_IGNORE_INDEX

    assert IGNORE_INDEX == CHAT_IGNORE_INDEX == -100


# ---- loss weights --------------------------------------------------------------------------------
def weighted(ids, labels, weight, *view_values):
    return {**sample(ids, labels, *view_values), "loss_weights": [weight] * len(ids)}


def test_loss_weights_follow_their_tokens_and_default_to_one():
    samples = [weighted([5, 6, 7], [X, 6, 7], 0.5), sample([8, 9], [X, 9])]
    padded = pad_collate(samples, pad_id=PAD, padding_side="left")
    assert padded["loss_weights"].tolist() == [[0.5, 0.5, 0.5], [0.0, 1.0, 1.0]]
    assert padded["loss_weights"].dtype == torch.float32
    packed = pack_collate(samples, max_length=6, pad_id=PAD)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, PAD]]
    assert packed["loss_weights"].tolist() == [[0.5, 0.5, 0.5, 1.0, 1.0, 0.0]]
    # No sample with weights: no tensor (the unweighted token mean).
    assert "loss_weights" not in pad_collate([sample([5, 6], [X, 6])], pad_id=PAD)
    assert "loss_weights" not in pack_collate([sample([5, 6], [X, 6])], max_length=4, pad_id=PAD)


def test_merged_branches_keep_their_weights_and_the_prefix_weighs_nothing():
    image = 4
    merged = merge_shared_prefix([weighted([1, image, 2, 7, 8], [X, X, X, 7, 8], 0.25),
                                  weighted([1, image, 2, 9], [X, X, X, 9], 0.25)], image_token_id=image)
    assert merged["branch_ids"] == [0, 0, 1, 1, 1, 2, 2]
    assert merged["loss_weights"] == [0.0, 0.0, 0.25, 0.25, 0.25, 0.25, 0.25]
    assert "loss_weights" not in merge_shared_prefix([sample([1, 2, 7], [X, X, 7]), sample([1, 2, 9], [X, X, 9])], 4)


def test_loss_weights_of_the_wrong_length_are_refused():
    with pytest.raises(ValueError, match="sample #0 has 3 input_ids but 2 loss_weights"):
        pad_collate([{**sample([5, 6, 7], [X, 6, 7]), "loss_weights": [1.0, 1.0]}], pad_id=PAD)
