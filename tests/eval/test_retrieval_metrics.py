"""Recall@k, target ranks and two-way image-text retrieval metrics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.eval.retrieval import recall_at_k, retrieval_metrics, target_mask, target_ranks

# Query i's correct item is item i (diagonal ground truth).
#   query 0: item 0 scores highest                                 -> rank 1
#   query 1: items 0 (0.9) and 2 (0.8) beat item 1 (0.7)           -> rank 3
#   query 2: item 0 (0.6) beats item 2 (0.5), item 1 (0.1) doesn't -> rank 2
SIMILARITY = torch.tensor(
    [
        [0.9, 0.1, 0.2],
        [0.9, 0.7, 0.8],
        [0.6, 0.1, 0.5],
    ]
)


def test_ranks_and_recall_by_hand() -> None:
    assert target_ranks(SIMILARITY).tolist() == [1, 3, 2]
    # r@1: only query 0 -> 1/3; r@2: queries 0 and 2 -> 2/3; r@3: all
    assert recall_at_k(SIMILARITY, ks=(1, 2, 3)) == pytest.approx({"r@1": 1 / 3, "r@2": 2 / 3, "r@3": 1.0})


def test_every_target_format_means_the_same() -> None:
    expected = recall_at_k(SIMILARITY, None, ks=(1, 2))
    assert recall_at_k(SIMILARITY, torch.tensor([0, 1, 2]), ks=(1, 2)) == expected
    assert recall_at_k(SIMILARITY, torch.eye(3, dtype=torch.bool), ks=(1, 2)) == expected
    assert recall_at_k(SIMILARITY, [[0], [1], [2]], ks=(1, 2)) == expected


def test_k_beyond_the_number_of_items_clamps() -> None:
    # Default ks (1, 5, 10) with 3 items: r@5 and r@10 mean "in the top 3", always a hit.
    assert recall_at_k(SIMILARITY) == pytest.approx({"r@1": 1 / 3, "r@5": 1.0, "r@10": 1.0})


def test_a_query_with_several_correct_items_hits_if_any_is_in_the_top_k() -> None:
    # Query 1 now accepts items 1 and 2; its best correct item is 2 (0.8), beaten only by
    # item 0 (0.9): rank 2. The other correct item (0.7) does not push it down.
    # Query 2 accepts items 0 and 1: item 0 is the top score -> rank 1.
    ranks = target_ranks(SIMILARITY, [[0], [1, 2], [0, 1]])
    assert ranks.tolist() == [1, 2, 1]
    recalls = recall_at_k(SIMILARITY, [[0], [1, 2], [0, 1]], ks=(1, 2))
    assert recalls == pytest.approx({"r@1": 2 / 3, "r@2": 1.0})


def test_ties_count_against_the_query() -> None:
    # The correct item 0 ties with item 1: ranked after it, a miss at k=1 and a hit at k=2.
    tied = torch.tensor([[0.5, 0.5, 0.1]])
    assert target_ranks(tied, [[0]]).tolist() == [2]
    assert recall_at_k(tied, [[0]], ks=(1, 2)) == {"r@1": 0.0, "r@2": 1.0}


def test_collapsed_scores_do_not_look_perfect() -> None:
    # Every item scores the same (collapsed embeddings): each correct item is ranked last.
    constant = torch.zeros(4, 4)
    assert target_ranks(constant).tolist() == [4, 4, 4, 4]
    assert recall_at_k(constant, ks=(1, 3, 4)) == {"r@1": 0.0, "r@3": 0.0, "r@4": 1.0}


@pytest.mark.parametrize("bad_ks", [(0,), (1, -1), (1.5,), (True,)])
def test_k_must_be_a_positive_integer(bad_ks) -> None:
    with pytest.raises(ValueError, match="every k in ks must be an integer >= 1"):
        recall_at_k(SIMILARITY, ks=bad_ks)


def test_recall_input_errors() -> None:
    with pytest.raises(ValueError, match="at least one cutoff"):
        recall_at_k(SIMILARITY, ks=())
    with pytest.raises(ValueError, match=r"needs as many queries as items; got 2 queries and 3 items"):
        recall_at_k(SIMILARITY[:2])
    with pytest.raises(ValueError, match=r"queries \[1\] have no correct item"):
        recall_at_k(SIMILARITY, [[0], [], [2]])
    with pytest.raises(ValueError, match=r"targets\[2\] = \[3\] holds an index outside \[0, 3\)"):
        recall_at_k(SIMILARITY, [[0], [1], [3]])
    with pytest.raises(ValueError, match=r"target indices must lie in \[0, 3\)"):
        recall_at_k(SIMILARITY, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="got 2 target lists for 3 queries"):
        recall_at_k(SIMILARITY, [[0], [1]])
    with pytest.raises(ValueError, match=r"bool target mask must have shape \[n_queries, n_items\]"):
        recall_at_k(SIMILARITY, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="index target tensor must be integer"):
        recall_at_k(SIMILARITY, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"similarity must be \[n_queries, n_items\]"):
        recall_at_k(torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.full((2, 2), float("nan")))


def test_target_mask_from_index_lists() -> None:
    mask = target_mask([[0, 2], [1]], n_queries=2, n_items=3)
    assert mask.tolist() == [[True, False, True], [False, True, False]]


def test_retrieval_metrics_both_directions_by_hand() -> None:
    # Two images on the axes, four captions (two per image) at chosen angles.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor(
        [
            [0.9, 0.1],  # caption of image 0, close to it
            [0.2, 0.8],  # caption of image 0, but closer to image 1
            [0.1, 0.9],  # caption of image 1
            [0.6, 0.4],  # caption of image 1, but closer to image 0
        ]
    )
    text_to_image = [0, 0, 1, 1]
    # cosine ordering, image 0: text0 (0.99) > text3 (0.83) > text1 (0.24) > text2 (0.11)
    #   its best caption, text 0, is first -> rank 1
    # image 1: text2 (0.99) > text1 (0.97) > text3 (0.55) > text0 (0.11): text 2 first -> rank 1
    # text -> image: texts 0 and 2 rank their image first; text 1 prefers image 1 and text 3
    #   prefers image 0 -> ranks [1, 2, 1, 2]
    metrics = retrieval_metrics(images, texts, text_to_image, ks=(1, 2))
    assert metrics == pytest.approx(
        {
            "i2t_r@1": 1.0,
            "i2t_r@2": 1.0,
            "i2t_mean_rank": 1.0,
            "i2t_median_rank": 1.0,
            "t2i_r@1": 0.5,
            "t2i_r@2": 1.0,
            "t2i_mean_rank": 1.5,
            "t2i_median_rank": 1.5,  # mean of the middle ranks 1 and 2
        }
    )


def test_retrieval_metrics_are_scale_invariant() -> None:
    images, texts = torch.randn(6, 8), torch.randn(6, 8)
    scales = torch.rand(6, 1) * 10 + 0.1
    assert retrieval_metrics(images * scales, texts) == retrieval_metrics(images, texts / scales)


def test_retrieval_metrics_diagonal_default() -> None:
    embeddings = torch.randn(5, 16)
    metrics = retrieval_metrics(embeddings, embeddings, ks=(1,))
    assert metrics["i2t_r@1"] == metrics["t2i_r@1"] == 1.0
    assert metrics["i2t_mean_rank"] == metrics["t2i_median_rank"] == 1.0


def test_retrieval_metrics_input_errors() -> None:
    with pytest.raises(ValueError, match="needs as many texts as images; got 3 texts and 2 images"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="share their width D, got 4 and 5"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"text_to_image must have shape \[n_texts\] = \[3\]"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(3, 4), [0, 1])
    with pytest.raises(ValueError, match=r"queries \[1\] have no correct item"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(2, 4), [0, 0])  # image 1 has no caption
    with pytest.raises(ValueError, match=r"embeddings must be \[n, D\]"):
        retrieval_metrics(torch.randn(2, 4, 1), torch.randn(2, 4))
    with pytest.raises(ValueError, match="integer >= 1"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(2, 4), ks=(0,))


@st.composite
def retrieval_problems(draw):
    n_queries = draw(st.integers(1, 6))
    n_items = draw(st.integers(1, 8))
    # Few distinct values so that ties are common.
    values = draw(st.lists(st.integers(-2, 2), min_size=n_queries * n_items, max_size=n_queries * n_items))
    similarity = torch.tensor(values, dtype=torch.float32).reshape(n_queries, n_items)
    targets = [
        draw(st.lists(st.integers(0, n_items - 1), min_size=1, max_size=n_items, unique=True))
        for _ in range(n_queries)
    ]
    return similarity, targets


@settings(max_examples=50, deadline=None)
@given(problem=retrieval_problems())
def test_recall_is_monotone_in_k_and_one_from_n_items_on(problem) -> None:
    similarity, targets = problem
    n_items = similarity.shape[1]
    ks = tuple(range(1, n_items + 3))
    recalls = [recall_at_k(similarity, targets, ks=ks)[f"r@{k}"] for k in ks]
    assert all(a <= b for a, b in zip(recalls, recalls[1:]))
    assert all(r == 1.0 for r in recalls[n_items - 1 :])
    ranks = target_ranks(similarity, targets)
    assert ((ranks >= 1) & (ranks <= n_items)).all()
