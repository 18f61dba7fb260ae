"""Multiple-choice evaluation by likelihood: score each option as a continuation of the prompt.

This is the "loglikelihood" protocol of the EleutherAI lm-evaluation-harness and of GPT-3
(Brown et al., "Language Models are Few-Shot Learners", 2020, section 2.4): the model never
generates; instead every option is appended to the prompt and scored by
``log p(option | prompt) = sum_t log p(option_t | prompt, option_<t)``. The option with the
highest score is the answer. Summed log-probabilities favour short options, so GPT-3
compares the per-token mean for most tasks (``normalize="mean"``).

Two entry points:

* :func:`score_options` / :func:`pick_option` take a ``logprob_fn(prompt, continuation)``
  returning the per-token log-probabilities of the continuation, so they work with any model;
* :func:`continuation_logprobs` is the tensor computation such a function needs, from the
  logits of a causal model over ``prompt + continuation``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

LogprobFn = Callable[[str, str], Tensor]
Normalize = Literal["mean", "sum"]
_NORMALIZE_MODES = ("mean", "sum")


def _check_normalize(normalize: str) -> None:
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}, got {normalize!r}")


def score_options(
    logprob_fn: LogprobFn,
    prompt: str,
    options: Sequence[str],
    normalize: Normalize = "mean",
) -> list[float]:
    """Log-likelihood score of every option as a continuation of ``prompt``.

    Args:
        logprob_fn: ``(prompt, continuation) -> [L]`` log-probability of each of the ``L``
            tokens of the continuation given everything before it.
        prompt: the question (with whatever template the model expects).
        options: the candidate answers, each scored as the continuation of ``prompt``.
        normalize: ``"sum"``: total log-probability; ``"mean"``: per-token mean, which does
            not penalise long options for having more tokens.

    Returns:
        One score per option, higher is more likely.
    """
    _check_normalize(normalize)
    if isinstance(options, str):
        raise ValueError("options must be a sequence of answer strings, got a single str")
    if not options:
        raise ValueError("options is empty: need at least one option to score")
    scores = []
    for index, option in enumerate(options):
        token_logprobs = logprob_fn(prompt, option)
        if not isinstance(token_logprobs, Tensor) or token_logprobs.ndim != 1:
            got = (
                list(token_logprobs.shape)
                if isinstance(token_logprobs, Tensor)
                else type(token_logprobs).__name__
            )
            raise ValueError(
                f"logprob_fn must return a 1-D tensor [L] of token log-probabilities, got {got}"
            )
        if token_logprobs.numel() == 0:
            raise ValueError(
                f"option {index} ({option!r}) has no tokens; an empty continuation cannot be scored"
            )
        if torch.isnan(token_logprobs).any():
            raise ValueError(f"logprob_fn returned NaN log-probabilities for option {index} ({option!r})")
        total = token_logprobs.double().sum()
        scores.append((total / token_logprobs.numel() if normalize == "mean" else total).item())
    logger.debug("option scores (%s): %s", normalize, scores)
    return scores


def pick_option(
    logprob_fn: LogprobFn,
    prompt: str,
    options: Sequence[str],
    normalize: Normalize = "mean",
) -> int:
    """Index of the highest-scoring option (see :func:`score_options`); ties go to the first."""
    scores = score_options(logprob_fn, prompt, options, normalize)
    return max(range(len(scores)), key=scores.__getitem__)


def continuation_logprobs(
    logits: Tensor,
    input_ids: Tensor,
    continuation_mask: Tensor,
    normalize: Normalize = "sum",
) -> Tensor:
    """Log-probability of the masked tokens of each row under a causal model.

    A causal model's logits at position ``t`` predict token ``t + 1``, so token ``t`` is
    scored with ``log_softmax(logits[:, t - 1])[input_ids[:, t]]``; position 0 has no
    prediction and may not be masked. Only masked positions go through the (float32)
    log-softmax, so the cost is ``O(#masked * V)`` rather than ``O(B * T * V)``.

    Args:
        logits: ``[B, T, V]`` next-token logits of ``input_ids``.
        input_ids: ``[B, T]`` prompt followed by continuation (and padding), int.
        continuation_mask: ``[B, T]`` bool, True on the continuation tokens to score; every
            row needs at least one.
        normalize: ``"sum"``: ``sum_t log p(x_t | x_<t)`` over masked ``t``; ``"mean"``: that
            sum divided by the number of masked tokens (length-normalised).

    Returns:
        ``[B]`` float32 log-probabilities (<= 0).
    """
    _check_normalize(normalize)
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {list(logits.shape)}")
    batch, length, vocab = logits.shape
    if input_ids.shape != (batch, length) or continuation_mask.shape != (batch, length):
        raise ValueError(
            f"input_ids and continuation_mask must be [B, T] = [{batch}, {length}] to match logits, "
            f"got {list(input_ids.shape)} and {list(continuation_mask.shape)}"
        )
    if input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    continuation_mask = continuation_mask.bool()
    if continuation_mask[:, 0].any():
        raise ValueError(
            "continuation_mask is True at position 0, which no logit predicts; mask the prompt there"
        )
    target_counts = continuation_mask.sum(dim=1)
    empty_rows = (target_counts == 0).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(
            f"rows {empty_rows} of continuation_mask mark no token; each row needs a continuation"
        )
    if (input_ids[continuation_mask] < 0).any() or (input_ids[continuation_mask] >= vocab).any():
        raise ValueError(f"continuation token ids must lie in [0, {vocab}) for logits with V = {vocab}")

    # Position p of the shifted mask says: the logits at p predict a continuation token at p + 1.
    rows, predicting_positions = continuation_mask[:, 1:].nonzero(as_tuple=True)
    predicting_logits = logits[rows, predicting_positions].float()  # [M, V]
    targets = input_ids[rows, predicting_positions + 1]  # [M]
    token_logprobs = predicting_logits.log_softmax(dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    totals = torch.zeros(batch, dtype=torch.float32, device=logits.device).index_add(0, rows, token_logprobs)
    if normalize == "mean":
        return totals / target_counts
    return totals
