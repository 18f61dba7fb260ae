"""Multiple-choice scoring by continuation log-likelihood."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.eval.choice import continuation_logprobs, pick_option, score_options


def hand_built_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vocabulary of 3, sequences of 4. Logits are log-probabilities plus a constant, so the
    softmax of position t is the written distribution (the constant cancels)."""
    probabilities = torch.tensor(
        [
            # row 0: "prompt" tokens 0 1, continuation 2 0 (positions 2, 3)
            [[0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]],
            # row 1: prompt token 1, continuation 1 2 (positions 1, 2), then padding
            [[0.4, 0.4, 0.2], [0.7, 0.2, 0.1], [0.3, 0.5, 0.2], [1 / 3, 1 / 3, 1 / 3]],
        ]
    )
    logits = probabilities.log() + 7.0
    input_ids = torch.tensor([[0, 1, 2, 0], [1, 1, 2, 0]])
    continuation_mask = torch.tensor([[False, False, True, True], [False, True, True, False]])
    return logits, input_ids, continuation_mask


def test_continuation_logprobs_by_hand() -> None:
    logits, input_ids, continuation_mask = hand_built_batch()
    # Token t is predicted by the distribution at t - 1:
    # row 0: token 2 at position 2 from position 1: p = 0.5; token 0 at position 3 from 2: p = 0.1
    #        log(0.5) + log(0.1) = log(0.05)
    # row 1: token 1 at position 1 from position 0: p = 0.4; token 2 at position 2 from 1: p = 0.1
    #        log(0.4) + log(0.1) = log(0.04)
    # (Reading the distribution at t itself, the off-by-one bug, would give 0.3 * 0.3 and 0.2 * 0.2.)
    expected_sum = torch.tensor([math.log(0.05), math.log(0.04)])
    torch.testing.assert_close(continuation_logprobs(logits, input_ids, continuation_mask), expected_sum)
    torch.testing.assert_close(
        continuation_logprobs(logits, input_ids, continuation_mask, normalize="mean"), expected_sum / 2
    )


def test_continuation_logprobs_accepts_an_integer_mask_and_half_precision_logits() -> None:
    logits, input_ids, continuation_mask = hand_built_batch()
    result = continuation_logprobs(logits.bfloat16(), input_ids, continuation_mask.long())
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, torch.tensor([math.log(0.05), math.log(0.04)]), atol=0.05, rtol=0.0)


def test_continuation_logprobs_input_errors() -> None:
    logits, input_ids, continuation_mask = hand_built_batch()
    at_position_zero = continuation_mask.clone()
    at_position_zero[0, 0] = True
    with pytest.raises(ValueError, match="position 0"):
        continuation_logprobs(logits, input_ids, at_position_zero)
    empty_row = continuation_mask.clone()
    empty_row[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\] of continuation_mask mark no token"):
        continuation_logprobs(logits, input_ids, empty_row)
    with pytest.raises(ValueError, match=r"must be \[B, T\] = \[2, 4\]"):
        continuation_logprobs(logits, input_ids[:, :3], continuation_mask)
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\]"):
        continuation_logprobs(logits[0], input_ids, continuation_mask)
    with pytest.raises(ValueError, match="integer tensor"):
        continuation_logprobs(logits, input_ids.float(), continuation_mask)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 3\)"):
        continuation_logprobs(logits, input_ids + 2, continuation_mask)
    with pytest.raises(ValueError, match="normalize must be one of"):
        continuation_logprobs(logits, input_ids, continuation_mask, normalize="max")  # type: ignore[arg-type]


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(2, 6),
    vocab=st.integers(2, 5),
    seed=st.integers(0, 2**16),
)
def test_continuation_logprobs_matches_a_position_by_position_loop(
    batch: int, length: int, vocab: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=generator) * 3
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    continuation_mask = torch.rand(batch, length, generator=generator) < 0.5
    continuation_mask[:, 0] = False
    continuation_mask[:, -1] = True
    expected = torch.zeros(batch)
    for row in range(batch):
        for position in range(1, length):
            if continuation_mask[row, position]:
                distribution = torch.softmax(logits[row, position - 1], dim=-1)
                expected[row] += distribution[input_ids[row, position]].log()
    torch.testing.assert_close(continuation_logprobs(logits, input_ids, continuation_mask), expected)
    # The mean is the sum over the number of scored tokens, and both are log-probabilities.
    counts = continuation_mask.sum(dim=1)
    torch.testing.assert_close(
        continuation_logprobs(logits, input_ids, continuation_mask, normalize="mean") * counts, expected
    )
    assert (expected <= 0).all()


# Per-token log-probabilities an imaginary model gives each option after the prompt.
TOKEN_LOGPROBS = {
    "red": [-1.0],
    "dark red": [-0.5, -0.9],
    "blue": [-3.0],
}


def table_logprob_fn(prompt: str, continuation: str) -> torch.Tensor:
    assert prompt == "Q: what colour is the ball? A:"
    return torch.tensor(TOKEN_LOGPROBS[continuation])


PROMPT = "Q: what colour is the ball? A:"


def test_sum_favours_short_options_and_mean_does_not() -> None:
    options = ["red", "dark red", "blue"]
    # sum:  red -1.0, dark red -0.5 - 0.9 = -1.4, blue -3.0   -> "red"
    # mean: red -1.0, dark red -1.4 / 2   = -0.7, blue -3.0   -> "dark red"
    sums = score_options(table_logprob_fn, PROMPT, options, normalize="sum")
    means = score_options(table_logprob_fn, PROMPT, options, normalize="mean")
    assert sums == pytest.approx([-1.0, -1.4, -3.0])
    assert means == pytest.approx([-1.0, -0.7, -3.0])
    assert pick_option(table_logprob_fn, PROMPT, options, normalize="sum") == 0
    assert pick_option(table_logprob_fn, PROMPT, options, normalize="mean") == 1


def test_pick_option_breaks_ties_toward_the_first_option() -> None:
    assert pick_option(lambda prompt, option: torch.tensor([-0.5]), PROMPT, ["yes", "no"]) == 0


def test_score_options_with_continuation_logprobs_of_a_bigram_model() -> None:
    """End to end: a character bigram "model" whose logits at t are log P(next | token t)."""
    vocabulary = "ab "
    bigram = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])  # rows: previous char

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([vocabulary.index(c) for c in text])

    def logprob_fn(prompt: str, continuation: str) -> torch.Tensor:
        ids = encode(prompt + continuation)
        start = len(prompt)
        return bigram[ids[start - 1 : -1], ids[start:]].log()

    prompt, options = "ab ", ["a", "bb"]
    # "a" after " ": P(a | ' ') = 0.5           -> sum log 0.5 = -0.693
    # "bb" after " ": P(b | ' ') P(b | b) = 0.4 * 0.2 = 0.08 -> sum log 0.08 = -2.526
    scores = score_options(logprob_fn, prompt, options, normalize="sum")
    assert scores == pytest.approx([math.log(0.5), math.log(0.08)])

    # The same numbers from batched logits of the full sequences, padded with "a".
    sequences = [encode(prompt + option) for option in options]
    input_ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=0)
    logits = bigram[input_ids].log()  # [B, T, V]: the distribution of the next token
    continuation_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, option in enumerate(options):
        continuation_mask[row, len(prompt) : len(prompt) + len(option)] = True
    torch.testing.assert_close(
        continuation_logprobs(logits, input_ids, continuation_mask), torch.tensor(scores, dtype=torch.float32)
    )


def test_score_options_input_errors() -> None:
    with pytest.raises(ValueError, match="options is empty"):
        score_options(table_logprob_fn, PROMPT, [])
    with pytest.raises(ValueError, match="got a single str"):
        score_options(table_logprob_fn, PROMPT, "red")
    with pytest.raises(ValueError, match="normalize must be one of"):
        score_options(table_logprob_fn, PROMPT, ["red"], normalize="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"1-D tensor \[L\].*got \[1, 1\]"):
        score_options(lambda p, c: torch.zeros(1, 1), PROMPT, ["red"])
    with pytest.raises(ValueError, match="got list"):
        score_options(lambda p, c: [-1.0], PROMPT, ["red"])  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="option 0 \\('red'\\) has no tokens"):
        score_options(lambda p, c: torch.zeros(0), PROMPT, ["red"])
    with pytest.raises(ValueError, match="NaN"):
        score_options(lambda p, c: torch.tensor([float("nan")]), PROMPT, ["red"])
