"""Evaluation metrics, implemented from their papers and reference scripts.

* :mod:`.vqa`: official VQA answer normalisation, exact match and soft accuracy, per-type breakdown;
* :mod:`.caption`: corpus BLEU and CIDEr-D as in coco-caption;
* :mod:`.retrieval`: image<->text recall@k and ranks;
* :mod:`.choice`: multiple-choice answering by option log-likelihood.
"""

from __future__ import annotations

from .caption import BleuStats, bleu, bleu_stats, cider, cider_scores, ptb_tokenize_lite, sentence_bleu
from .choice import continuation_logprobs, pick_option, score_options
from .retrieval import recall_at_k, retrieval_metrics, target_mask, target_ranks
from .vqa import (
    ANSWER_METRICS,
    accuracy_by_group,
    mean_accuracy,
    normalize_answer,
    vqa_accuracy,
    vqa_exact_match,
)

__all__ = [
    "ANSWER_METRICS",
    "BleuStats",
    "accuracy_by_group",
    "bleu",
    "bleu_stats",
    "cider",
    "cider_scores",
    "continuation_logprobs",
    "mean_accuracy",
    "normalize_answer",
    "pick_option",
    "ptb_tokenize_lite",
    "recall_at_k",
    "retrieval_metrics",
    "score_options",
    "sentence_bleu",
    "target_mask",
    "target_ranks",
    "vqa_accuracy",
    "vqa_exact_match",
]
