"""Caption metrics: corpus BLEU and CIDEr-D, as computed by coco-caption.

Reference implementation: https://github.com/tylin/coco-caption (``pycocoevalcap``),
files ``bleu/bleu_scorer.py`` and ``cider/cider_scorer.py`` (its "CIDEr" is CIDEr-D).
Written from the papers and checked against that code's formulas:

* BLEU, Papineni et al., "BLEU: a Method for Automatic Evaluation of Machine Translation",
  ACL 2002. Corpus level: clipped n-gram counts and candidate n-gram counts are summed over
  the corpus before dividing; the brevity penalty uses, per candidate, the reference length
  closest to the candidate's (ties to the shorter one, coco-caption's ``"closest"`` option).
* CIDEr-D, Vedantam et al., "CIDEr: Consensus-based Image Description Evaluation",
  CVPR 2015, with the "-D" changes of coco-caption: candidate tf-idf weights clipped by the
  reference's, a Gaussian penalty on the length difference (sigma 6), and a x10 scale.

Both tokenise with :func:`ptb_tokenize_lite`, a dependency-free stand-in for the Stanford
PTBTokenizer that coco-caption runs first, so scores are close to but not bit-identical with
published coco-caption numbers.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

Tokenizer = Callable[[str], list[str]]
NGram = tuple[str, ...]

# A token is a number with decimal points or thousands separators ("3.5", "1,000"), or a
# run of letters/digits joined by inner apostrophes or hyphens ("don't", "t-shirt").
_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+(?:['\-][^\W_]+)*")


def ptb_tokenize_lite(text: str) -> list[str]:
    """Lower-case and split into words, dropping punctuation (coco PTBTokenizer-lite).

    coco-caption tokenises with the Stanford PTBTokenizer and then deletes punctuation
    tokens (``. , ? ! : ; - -- ... ' '' ` `` ( ) { }``). This keeps the same words without
    Java: every character that is not part of a word or number separates tokens. Unlike PTB
    it keeps clitics attached (``"don't"`` is one token, PTB gives ``"do", "n't"``).

    Example: ``ptb_tokenize_lite("A man's T-shirt, 3.5 sizes!") == ["a", "man's", "t-shirt",
    "3.5", "sizes"]``.
    """
    return _TOKEN.findall(text.lower())


def _ngram_counts(tokens: Sequence[str], max_n: int) -> Counter[NGram]:
    """Counts of every n-gram of ``tokens`` with ``1 <= n <= max_n``."""
    return Counter(
        tuple(tokens[start : start + n])
        for n in range(1, max_n + 1)
        for start in range(len(tokens) - n + 1)
    )


def _check_corpus(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(candidates, str):
        raise ValueError("candidates must be a list of captions, got a single str")
    if len(candidates) != len(references):
        raise ValueError(
            f"got {len(candidates)} candidates but {len(references)} reference lists; "
            "expected one list of reference captions per candidate"
        )
    if not candidates:
        raise ValueError("cannot score an empty corpus: got zero candidates")
    for index, (candidate, refs) in enumerate(zip(candidates, references)):
        if not isinstance(candidate, str):
            raise ValueError(f"candidates[{index}] must be a str, got {type(candidate).__name__}")
        if isinstance(refs, str):
            raise ValueError(
                f"references[{index}] must be a list of reference captions, got a single str "
                f"{refs!r} (wrap it in a list)"
            )
        if len(refs) == 0:
            raise ValueError(f"references[{index}] is empty: every candidate needs at least one reference")


@dataclass(frozen=True)
class BleuStats:
    """Corpus BLEU and the quantities it is made of.

    Attributes:
        score: ``brevity_penalty * exp(mean_n log precisions[n])``, in [0, 1].
        precisions: clipped (modified) n-gram precision for n = 1..max_n.
        brevity_penalty: ``1`` if ``candidate_length > reference_length`` else
            ``exp(1 - reference_length / candidate_length)``.
        candidate_length: total number of candidate tokens ``c``.
        reference_length: sum over candidates of the closest reference length ``r``.
    """

    score: float
    precisions: tuple[float, ...]
    brevity_penalty: float
    candidate_length: int
    reference_length: int


def bleu_stats(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    max_n: int = 4,
    tokenize: Tokenizer = ptb_tokenize_lite,
) -> BleuStats:
    """Corpus-level BLEU-``max_n`` with its precisions and brevity penalty.

    Modified precision of order n (Papineni et al. 2002, eq. 1)::

        p_n = sum_candidates sum_ngram min(count_cand(g), max_ref count_ref(g))
              / sum_candidates (len(cand) - n + 1)

    ``BLEU = BP * (p_1 * ... * p_N) ** (1/N)``. Unlike coco-caption, which adds 1e-15 / 1e-9
    to every ratio, no smoothing is applied: a corpus with no matching n-gram of some order
    (or no n-gram of that order at all) scores exactly 0.

    Args:
        candidates: one generated caption per image.
        references: per image, the list of its reference captions.
        max_n: highest n-gram order (4 for BLEU-4).
        tokenize: text -> tokens; applied to candidates and references alike.
    """
    _check_corpus(candidates, references)
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    matched = [0] * max_n
    proposed = [0] * max_n
    candidate_length = 0
    reference_length = 0
    for candidate, refs in zip(candidates, references):
        candidate_tokens = tokenize(candidate)
        reference_tokens = [tokenize(r) for r in refs]
        # Clipping: an n-gram earns credit at most as often as it occurs in any one reference.
        max_reference_counts: Counter[NGram] = Counter()
        for tokens in reference_tokens:
            max_reference_counts |= _ngram_counts(tokens, max_n)
        for ngram, count in _ngram_counts(candidate_tokens, max_n).items():
            matched[len(ngram) - 1] += min(count, max_reference_counts[ngram])
        for n in range(1, max_n + 1):
            proposed[n - 1] += max(len(candidate_tokens) - n + 1, 0)
        candidate_length += len(candidate_tokens)
        reference_length += min(
            (abs(len(tokens) - len(candidate_tokens)), len(tokens)) for tokens in reference_tokens
        )[1]

    precisions = tuple(m / p if p else 0.0 for m, p in zip(matched, proposed))
    if candidate_length > reference_length:
        brevity_penalty = 1.0
    elif candidate_length == 0:
        brevity_penalty = 0.0
    else:
        brevity_penalty = math.exp(1.0 - reference_length / candidate_length)
    if min(precisions) > 0.0:
        score = brevity_penalty * math.exp(sum(math.log(p) for p in precisions) / max_n)
    else:
        logger.debug("BLEU-%d is 0: no matching n-gram for some order (precisions %s)", max_n, precisions)
        score = 0.0
    return BleuStats(score, precisions, brevity_penalty, candidate_length, reference_length)


def bleu(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    max_n: int = 4,
    tokenize: Tokenizer = ptb_tokenize_lite,
) -> float:
    """Corpus-level BLEU-``max_n`` in [0, 1]; see :func:`bleu_stats`.

    Corpus BLEU pools counts before dividing, so it is *not* the mean of sentence BLEUs.
    """
    return bleu_stats(candidates, references, max_n, tokenize).score


def sentence_bleu(
    candidate: str,
    references: Sequence[str],
    max_n: int = 4,
    tokenize: Tokenizer = ptb_tokenize_lite,
) -> float:
    """BLEU-``max_n`` of one caption against its references (a corpus of one)."""
    return bleu([candidate], [references], max_n, tokenize)


def cider_scores(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
    tokenize: Tokenizer = ptb_tokenize_lite,
) -> list[float]:
    """CIDEr-D of every candidate, as coco-caption's ``CiderScorer.compute_cider``.

    For n-gram order k, each caption becomes a tf-idf vector ``g_k`` with weight
    ``count(g) * (log N - log max(1, df(g)))``, where ``N`` is the number of images in the
    evaluated corpus and ``df(g)`` the number of images whose references contain ``g``; the
    idf therefore depends on the corpus, and a corpus of one image scores 0. Then::

        CIDEr-D(c, S) = 10 / (n |S|) * sum_{s in S} sum_{k=1..n}
                        exp(-(len(c) - len(s))^2 / (2 sigma^2))
                        * <min(g_k(c), g_k(s)), g_k(s)> / (|g_k(c)| |g_k(s)|)

    with ``min`` taken elementwise (clipping, so repeating a good word earns nothing) and the
    norms those of the unclipped vectors. Orders absent from both captions add 0 but still
    count in the ``1/n`` average, so captions shorter than n words cannot reach 10.

    Args:
        candidates: one generated caption per image.
        references: per image, the list of its reference captions.
        n: highest n-gram order.
        sigma: standard deviation of the length penalty, in tokens.
        tokenize: text -> tokens; applied to candidates and references alike.

    Returns:
        One score per candidate; the corpus CIDEr-D is their mean, :func:`cider`.
    """
    _check_corpus(candidates, references)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if len(candidates) == 1:
        logger.warning("CIDEr-D of a single image is 0 by construction: idf needs several images")

    candidate_tokens = [tokenize(c) for c in candidates]
    reference_tokens = [[tokenize(r) for r in refs] for refs in references]
    candidate_counts = [_ngram_counts(tokens, n) for tokens in candidate_tokens]
    reference_counts = [[_ngram_counts(tokens, n) for tokens in refs] for refs in reference_tokens]

    document_frequency: Counter[NGram] = Counter()
    for counts_of_image in reference_counts:
        document_frequency.update(set().union(*counts_of_image))
    log_n_images = math.log(len(candidates))

    def tfidf(counts: Counter[NGram]) -> tuple[list[dict[NGram, float]], list[float]]:
        vectors: list[dict[NGram, float]] = [{} for _ in range(n)]
        for ngram, term_frequency in counts.items():
            # n-grams unseen in any reference get df 1, i.e. the largest idf, log N.
            idf = log_n_images - math.log(max(1, document_frequency[ngram]))
            vectors[len(ngram) - 1][ngram] = term_frequency * idf
        norms = [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]
        return vectors, norms

    scores = []
    for tokens, counts, refs_tokens, refs_counts in zip(
        candidate_tokens, candidate_counts, reference_tokens, reference_counts
    ):
        candidate_vectors, candidate_norms = tfidf(counts)
        similarity_per_order = [0.0] * n
        for ref_tokens, ref_counts in zip(refs_tokens, refs_counts):
            reference_vectors, reference_norms = tfidf(ref_counts)
            # coco-caption measures length in bigrams; the difference is the same as in words
            # except when one caption is empty, and then the cosine is 0 anyway.
            length_penalty = math.exp(-((len(tokens) - len(ref_tokens)) ** 2) / (2 * sigma**2))
            for order in range(n):
                if candidate_norms[order] == 0.0 or reference_norms[order] == 0.0:
                    continue
                reference_vector = reference_vectors[order]
                clipped_dot = sum(
                    min(weight, reference_vector.get(ngram, 0.0)) * reference_vector.get(ngram, 0.0)
                    for ngram, weight in candidate_vectors[order].items()
                )
                cosine = clipped_dot / (candidate_norms[order] * reference_norms[order])
                similarity_per_order[order] += length_penalty * cosine
        scores.append(10.0 * sum(similarity_per_order) / n / len(refs_tokens))
    return scores


def cider(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
    tokenize: Tokenizer = ptb_tokenize_lite,
) -> float:
    """Corpus CIDEr-D: the mean of :func:`cider_scores` (0 to 10, typically 0 to ~1.5)."""
    scores = cider_scores(candidates, references, n, sigma, tokenize)
    return sum(scores) / len(scores)
