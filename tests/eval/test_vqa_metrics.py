"""VQA answer normalisation, exact match, soft accuracy and per-type accuracy."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.eval.vqa import (
    accuracy_by_group,
    mean_accuracy,
    normalize_answer,
    vqa_accuracy,
    vqa_exact_match,
)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),  # lower-case, then number word -> digit
        ("yes.", "yes"),  # period not followed by a digit is dropped
        ("a dog", "dog"),  # articles removed
        ("An apple", "apple"),
        ("the   Three   cats", "3 cats"),  # whitespace collapses
        ("1,000", "1000"),  # thousands separator deleted, digits stay together
        ("3.5", "3.5"),  # decimal point survives: it is followed by a digit
        ("3.", "3"),
        ("None", "0"),
        ("\tten\n", "10"),
        ("dont", "don't"),  # contraction gets its apostrophe back
        ("don't", "don't"),  # ... so both spellings meet
        ("isnt", "isn't"),
        ("Red-White!", "red white"),  # a mark between words becomes a space
        ("yes !", "yes"),  # a mark next to a space is deleted
        ("left/right", "left right"),
        ("what color?", "what color"),
        ("The man's hat", "man 's hat"),  # possessive split off as its own word
    ],
)
def test_normalize_answer_follows_official_rules(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_normalize_answer_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="must be a str"):
        normalize_answer(2)  # type: ignore[arg-type]


def test_exact_match_compares_normalized_answers() -> None:
    assert vqa_exact_match("Two.", "2") == 1.0
    assert vqa_exact_match("two", ["three", "a two"]) == 1.0
    assert vqa_exact_match("yes", ["no", "No."]) == 0.0


def test_exact_match_treats_a_bare_string_as_one_reference() -> None:
    # Were "dog" taken as the sequence "d", "o", "g", the prediction "d" would match.
    assert vqa_exact_match("d", "dog") == 0.0


# If k of the 10 humans gave the predicted answer, the 10 leave-one-out subsets are: k subsets
# that dropped a matching answer (k - 1 matches left) and 10 - k that kept all k, so
#   acc = (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10
@pytest.mark.parametrize(
    ("n_humans_agreeing", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # (1 * 0     + 9 * 1/3) / 10 = 3/10
        (2, 0.6),  # (2 * 1/3   + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # (3 * 2/3   + 7 * 1  ) / 10 = (2 + 7) / 10
        (4, 1.0),  # (4 * 1     + 6 * 1  ) / 10
        (10, 1.0),
    ],
)
def test_vqa_accuracy_with_ten_answers_averages_leave_one_out_subsets(
    n_humans_agreeing: int, expected: float
) -> None:
    answers = ["2"] * n_humans_agreeing + ["3"] * (10 - n_humans_agreeing)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)


def test_vqa_accuracy_without_ten_answers_uses_the_plain_formula() -> None:
    # min(1, #matches / 3) with no subset average: 2 of 5 answers match -> 2/3.
    assert vqa_accuracy("cat", ["cat", "Cat.", "dog", "dog", "dog"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("dog", ["cat", "Cat.", "dog", "dog", "dog"]) == 1.0
    # A single reference caps the soft score at 1/3: the reason exact match exists.
    assert vqa_accuracy("cat", "cat") == pytest.approx(1 / 3)


def test_vqa_accuracy_leave_one_out_can_be_forced() -> None:
    # 3 answers, all "cat": every subset keeps 2 matches -> min(1, 2/3) = 2/3.
    assert vqa_accuracy("cat", ["cat"] * 3, leave_one_out=True) == pytest.approx(2 / 3)
    # Turning it off for 10 answers: 2 matches -> 2/3 instead of 0.6.
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8, leave_one_out=False) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least 2 reference answers"):
        vqa_accuracy("cat", ["cat"], leave_one_out=True)


@pytest.mark.parametrize("metric", [vqa_accuracy, vqa_exact_match])
def test_empty_references_are_rejected(metric) -> None:
    with pytest.raises(ValueError, match="at least one answer"):
        metric("yes", [])


def test_mean_accuracy_averages_over_questions() -> None:
    predictions = ["yes", "two", "red"]
    references = [
        ["yes"] * 10,  # 1.0
        ["2", "2"] + ["3"] * 8,  # 0.6 (2 of 10 humans)
        ["blue"] * 10,  # 0.0
    ]
    # (1.0 + 0.6 + 0.0) / 3
    assert mean_accuracy(predictions, references) == pytest.approx(1.6 / 3)
    # Exact match counts the second question fully: (1 + 1 + 0) / 3.
    assert mean_accuracy(predictions, references, metric="exact_match") == pytest.approx(2 / 3)


def test_mean_accuracy_accepts_a_custom_metric() -> None:
    def first_answer_only(prediction: str, references) -> float:
        return float(normalize_answer(prediction) == normalize_answer(references[0]))

    assert mean_accuracy(["a", "b"], [["a", "x"], ["x", "b"]], metric=first_answer_only) == 0.5


def test_mean_accuracy_warns_when_soft_accuracy_cannot_reach_one(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="minivlm.eval.vqa"):
        score = mean_accuracy(["circle"], ["circle"])
    assert score == pytest.approx(1 / 3)
    assert "fewer than 3 reference answers" in caplog.text


def test_mean_accuracy_input_errors() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 reference lists"):
        mean_accuracy(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="zero questions"):
        mean_accuracy([], [])
    with pytest.raises(ValueError, match="single str"):
        mean_accuracy("yes", ["yes"])
    with pytest.raises(ValueError, match="unknown answer metric 'bleu'"):
        mean_accuracy(["a"], [["a"]], metric="bleu")
    with pytest.raises(ValueError, match="at least one answer"):
        mean_accuracy(["a"], [[]], metric="exact_match")


def test_accuracy_by_group_reports_each_question_type() -> None:
    predictions = ["red", "blue", "yes", "circle"]
    references = ["red", "green", "yes", "triangle"]
    groups = ["color", "color", "yes/no", "shape"]
    assert accuracy_by_group(predictions, references, groups, metric="exact_match") == {
        "color": 0.5,  # (1 + 0) / 2
        "shape": 0.0,
        "yes/no": 1.0,
    }


def test_accuracy_by_group_needs_one_group_per_prediction() -> None:
    with pytest.raises(ValueError, match="got 1 group labels for 2 predictions"):
        accuracy_by_group(["a", "b"], [["a"], ["b"]], ["color"])


words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)


@settings(max_examples=50, deadline=None)
@given(
    answer_words=st.lists(words, min_size=1, max_size=4),
    upper_mask=st.lists(st.booleans(), min_size=4, max_size=4),
    trailing=st.sampled_from(["", ".", "?", "!", " .", " ?", " !", "\n"]),
)
def test_scores_are_invariant_to_case_and_punctuation(
    answer_words: list[str], upper_mask: list[bool], trailing: str
) -> None:
    answer = " ".join(answer_words)
    decorated = " ".join(
        word.upper() if upper else word for word, upper in zip(answer_words, upper_mask)
    ) + trailing
    assert normalize_answer(decorated) == normalize_answer(answer)
    assert vqa_exact_match(decorated, [answer]) == 1.0
    assert vqa_accuracy(decorated, [answer] * 4 + ["zzzzzzzzzz"] * 6) == 1.0
