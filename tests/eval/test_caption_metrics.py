"""BLEU and CIDEr-D against hand-computed values and an independent dense re-derivation."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.eval.caption import bleu, bleu_stats, cider, cider_scores, ptb_tokenize_lite, sentence_bleu

# ---------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("A dog runs.", ["a", "dog", "runs"]),
        ("A man's T-shirt, 3.5 sizes!", ["a", "man's", "t-shirt", "3.5", "sizes"]),
        ("1,000 birds -- (maybe)", ["1,000", "birds", "maybe"]),
        ("  ", []),
    ],
)
def test_ptb_tokenize_lite(text: str, tokens: list[str]) -> None:
    assert ptb_tokenize_lite(text) == tokens


# ---------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------

CAT_CANDIDATE = "a cat sat on the mat"
CAT_REFERENCES = ["a cat sat on a mat", "the cat is on the mat"]


def test_bleu_of_one_sentence_by_hand() -> None:
    # candidate "a cat sat on the mat", references R1 "a cat sat on a mat", R2 "the cat is on the mat"
    # 1-grams: a cat sat on the mat -> each in some reference                          6/6
    # 2-grams: a-cat cat-sat sat-on (R1), on-the the-mat (R2)                           5/5
    # 3-grams: a-cat-sat cat-sat-on (R1), on-the-mat (R2); sat-on-the in neither         3/4
    # 4-grams: a-cat-sat-on (R1); cat-sat-on-the, sat-on-the-mat in neither              1/3
    # c = 6, closest r = 6 -> BP = 1;  BLEU-4 = (1 * 1 * 3/4 * 1/3) ** (1/4) = (1/4) ** (1/4)
    stats = bleu_stats([CAT_CANDIDATE], [CAT_REFERENCES])
    assert stats.precisions == pytest.approx((1.0, 1.0, 3 / 4, 1 / 3))
    assert stats.brevity_penalty == 1.0
    assert stats.score == pytest.approx(0.25**0.25)  # = 1 / sqrt(2) = 0.7071
    assert sentence_bleu(CAT_CANDIDATE, CAT_REFERENCES) == pytest.approx(1 / math.sqrt(2))


def test_bleu_pools_counts_over_the_corpus() -> None:
    # Adds candidate "a dog runs" with references of 4 and 6 words:
    #   1-grams 3/3, 2-grams 2/2, 3-grams 1/1, 4-grams 0/0 (too short to propose any)
    # pooled with the cat sentence: p1 = 9/9, p2 = 7/7, p3 = (3+1)/(4+1) = 4/5, p4 = 1/3
    # c = 6 + 3 = 9, r = 6 + 4 (closest to 3 words) = 10 -> BP = exp(1 - 10/9) = exp(-1/9)
    # BLEU-4 = (4/5 * 1/3) ** (1/4) * exp(-1/9) = (4/15) ** 0.25 * exp(-1/9) = 0.6430
    candidates = [CAT_CANDIDATE, "a dog runs"]
    references = [CAT_REFERENCES, ["a dog runs fast", "the dog runs in the park"]]
    stats = bleu_stats(candidates, references)
    assert stats.precisions == pytest.approx((1.0, 1.0, 4 / 5, 1 / 3))
    assert (stats.candidate_length, stats.reference_length) == (9, 10)
    assert stats.brevity_penalty == pytest.approx(math.exp(-1 / 9))
    assert stats.score == pytest.approx((4 / 15) ** 0.25 * math.exp(-1 / 9))
    # Not the mean of sentence BLEUs: alone, "a dog runs" proposes no 4-gram and scores 0.
    assert sentence_bleu("a dog runs", references[1]) == 0.0
    mean_of_sentences = (sentence_bleu(CAT_CANDIDATE, CAT_REFERENCES) + 0.0) / 2
    assert stats.score != pytest.approx(mean_of_sentences)


def test_bleu_brevity_penalty_for_a_short_candidate() -> None:
    # "a cat sat on" against "a cat sat on the mat": every n-gram matches, c = 4, r = 6
    # BP = exp(1 - 6/4) = exp(-1/2) = 0.6065
    assert sentence_bleu("a cat sat on", ["a cat sat on the mat"]) == pytest.approx(math.exp(-0.5))


def test_bleu_closest_reference_length_ties_go_to_the_shorter() -> None:
    # 5 words, references of 4 and 6 words are equally close: coco-caption takes 4, so c > r
    # and there is no penalty (taking 6 would give exp(1 - 6/5)).
    stats = bleu_stats(["a b c d e"], [["a b c d", "a b c d e f"]])
    assert stats.reference_length == 4
    assert stats.brevity_penalty == 1.0


def test_bleu_clips_repeated_words() -> None:
    # Papineni et al.'s example: "the" x7 against "the cat is on the mat" earns at most the 2
    # "the" of the reference: p1 = 2/7; c = 7 > r = 6 so BP = 1 and BLEU-1 = 2/7.
    assert bleu(["the the the the the the the"], [["the cat is on the mat"]], max_n=1) == pytest.approx(2 / 7)


def test_bleu_identical_is_one_and_disjoint_is_zero() -> None:
    references = [["a small red circle", "one red circle"], ["two blue squares on grass"]]
    assert bleu(["a small red circle", "two blue squares on grass"], references) == pytest.approx(1.0)
    assert bleu(["green triangle above water", "yellow star"], references) == 0.0


def test_bleu_ignores_case_and_punctuation() -> None:
    plain = bleu([CAT_CANDIDATE], [CAT_REFERENCES])
    assert bleu(["A cat, sat on the mat."], [["A cat sat on a mat!", "The cat is on the mat"]]) == plain


def test_bleu_input_errors() -> None:
    with pytest.raises(ValueError, match="2 candidates but 1 reference lists"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        bleu(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match=r"references\[0\] must be a list .* got a single str"):
        bleu(["a"], ["a"])
    with pytest.raises(ValueError, match="empty corpus"):
        bleu([], [])
    with pytest.raises(ValueError, match="max_n must be >= 1, got 0"):
        bleu(["a"], [["a"]], max_n=0)


vocabulary = st.sampled_from(["a", "red", "blue", "circle", "square", "on", "the", "grass"])
caption = st.lists(vocabulary, min_size=0, max_size=9).map(" ".join)


@settings(max_examples=40, deadline=None)
@given(
    corpus=st.lists(st.tuples(caption, st.lists(caption, min_size=1, max_size=3)), min_size=1, max_size=4),
    max_n=st.integers(1, 4),
)
def test_bleu_lies_between_zero_and_one(corpus, max_n: int) -> None:
    candidates = [candidate for candidate, _ in corpus]
    references = [refs for _, refs in corpus]
    stats = bleu_stats(candidates, references, max_n=max_n)
    assert 0.0 <= stats.score <= 1.0
    assert all(0.0 <= p <= 1.0 for p in stats.precisions)


@settings(max_examples=25, deadline=None)
@given(
    candidates=st.lists(st.lists(vocabulary, min_size=4, max_size=9).map(" ".join), min_size=1, max_size=4)
)
def test_bleu_of_a_candidate_among_its_references_is_one(candidates: list[str]) -> None:
    references = [[candidate, "grass grass"] for candidate in candidates]
    assert bleu(candidates, references) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------

TWO_IMAGES_CANDIDATES = ["cat sat", "dog ran"]
TWO_IMAGES_REFERENCES = [["cat sat", "dog sat"], ["dog ran"]]


def test_cider_unigrams_by_hand() -> None:
    # N = 2 images. Document frequency over the references of each image:
    #   cat 1, sat 1, dog 2 (both images), ran 1  ->  idf = ln 2 - ln df: cat, sat, ran ln2; dog 0
    # Image 1, candidate (cat ln2, sat ln2), norm ln2 * sqrt2:
    #   vs "cat sat": same vector, cosine 1
    #   vs "dog sat" = (dog 0, sat ln2), norm ln2: clipped dot = min(ln2, ln2) * ln2 = ln2^2,
    #       cosine = ln2^2 / (ln2 sqrt2 * ln2) = 1/sqrt2
    #   equal lengths, no penalty: CIDEr = 10 * (1 + 1/sqrt2) / 2 refs = 8.5355
    # Image 2: candidate equals its only reference: 10
    expected_per_image = [5 * (1 + 1 / math.sqrt(2)), 10.0]
    scores = cider_scores(TWO_IMAGES_CANDIDATES, TWO_IMAGES_REFERENCES, n=1)
    assert scores == pytest.approx(expected_per_image)
    assert cider(TWO_IMAGES_CANDIDATES, TWO_IMAGES_REFERENCES, n=1) == pytest.approx(sum(scores) / 2)


def test_cider_four_orders_by_hand() -> None:
    # Bigrams: cat-sat, dog-sat, dog-ran each appear for one image -> idf ln2.
    # Image 1: bigram cosine 1 vs "cat sat", 0 vs "dog sat"; unigrams as above;
    #   3- and 4-grams do not exist: they add 0 but still count in the mean over 4 orders.
    #   10 * [(1 + 1/sqrt2) + (1 + 0) + 0 + 0] / 4 orders / 2 refs = 1.25 * (2 + 1/sqrt2) = 3.3839
    # Image 2: 10 * (1 + 1 + 0 + 0) / 4 / 1 = 5
    expected_per_image = [1.25 * (2 + 1 / math.sqrt(2)), 5.0]
    assert cider_scores(TWO_IMAGES_CANDIDATES, TWO_IMAGES_REFERENCES) == pytest.approx(expected_per_image)


def test_cider_length_penalty_by_hand() -> None:
    # Image 1: candidate "cat" vs reference "cat sat"; image 2: "dog" vs "dog". Every unigram
    # has df 1 -> idf ln2. Image 1 cosine = ln2^2 / (ln2 * ln2 sqrt2) = 1/sqrt2 and the lengths
    # differ by 1 word: penalty exp(-1^2 / (2 * 6^2)) = exp(-1/72).
    scores = cider_scores(["cat", "dog"], [["cat sat"], ["dog"]], n=1)
    assert scores == pytest.approx([10 * math.exp(-1 / 72) / math.sqrt(2), 10.0])


def test_cider_clips_repeated_words() -> None:
    # Image 1: "cat cat" vs "cat". Unclipped, the cosine of (2 ln2) and (ln2) would be 1; the
    # clipped dot min(2 ln2, ln2) * ln2 = ln2^2 over norms 2 ln2 * ln2 gives 1/2, times the
    # 1-word length penalty exp(-1/72).
    scores = cider_scores(["cat cat", "dog"], [["cat"], ["dog"]], n=1)
    assert scores[0] == pytest.approx(10 * 0.5 * math.exp(-1 / 72))


def test_cider_of_a_single_image_is_zero(caplog) -> None:
    # idf = ln 1 - ln 1 = 0 for every n-gram: consensus needs a corpus.
    with caplog.at_level(logging.WARNING, logger="minivlm.eval.caption"):
        assert cider(["a red circle"], [["a red circle"]]) == 0.0
    assert "single image" in caplog.text


def test_cider_identical_long_captions_score_ten_and_disjoint_zero() -> None:
    references = [["a red circle on grass"], ["two blue squares near water"]]
    assert cider(["a red circle on grass", "two blue squares near water"], references) == pytest.approx(10.0)
    assert cider(["yellow star", "green triangle"], references) == 0.0


def test_cider_input_errors() -> None:
    with pytest.raises(ValueError, match="1 candidates but 2 reference lists"):
        cider(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        cider(["a", "b"], [[], ["b"]])
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        cider(["a", "b"], [["a"], ["b"]], n=0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        cider(["a", "b"], [["a"], ["b"]], sigma=0.0)


def dense_cider_d(
    candidates: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0
) -> list[float]:
    """CIDEr-D re-derived as matrix algebra, straight from Vedantam et al. eq. 2-4 plus the
    coco-caption "-D" changes: one dense count matrix per n-gram order over a shared vocabulary."""
    texts = [ptb_tokenize_lite(c) for c in candidates]
    refs = [[ptb_tokenize_lite(r) for r in rs] for rs in references]
    n_images = len(candidates)
    per_order = np.zeros((n_images, n))
    for k in range(1, n + 1):

        def grams(tokens: list[str]) -> list[tuple[str, ...]]:
            return [tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1)]

        vocab = sorted({g for t in texts + [r for rs in refs for r in rs] for g in grams(t)})
        index = {g: i for i, g in enumerate(vocab)}

        def counts(tokens: list[str]) -> np.ndarray:
            vector = np.zeros(len(vocab))
            for g in grams(tokens):
                vector[index[g]] += 1
            return vector

        # df[g] = number of images with g in at least one reference.
        appears = np.array([np.any([counts(r) > 0 for r in rs], axis=0) for rs in refs])
        appears = appears.reshape(n_images, len(vocab))
        idf = np.log(n_images) - np.log(np.maximum(1.0, appears.sum(axis=0)))
        for image in range(n_images):
            g_c = counts(texts[image]) * idf
            for r in refs[image]:
                g_s = counts(r) * idf
                denominator = np.linalg.norm(g_c) * np.linalg.norm(g_s)
                cosine = np.minimum(g_c, g_s) @ g_s / denominator if denominator > 0 else 0.0
                penalty = np.exp(-((len(texts[image]) - len(r)) ** 2) / (2 * sigma**2))
                per_order[image, k - 1] += penalty * cosine / len(refs[image])
    return list(10.0 * per_order.mean(axis=1))


@settings(max_examples=30, deadline=None)
@given(
    corpus=st.lists(st.tuples(caption, st.lists(caption, min_size=1, max_size=3)), min_size=2, max_size=5),
    n=st.integers(1, 4),
)
def test_cider_agrees_with_dense_re_derivation(corpus, n: int) -> None:
    candidates = [candidate for candidate, _ in corpus]
    references = [refs for _, refs in corpus]
    expected = dense_cider_d(candidates, references, n=n)
    assert cider_scores(candidates, references, n=n) == pytest.approx(expected)
