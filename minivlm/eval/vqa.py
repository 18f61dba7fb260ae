"""VQA answer normalisation and accuracy.

Two references define the protocol and are followed rule for rule:

* the official VQA v1/v2 evaluation script, ``vqaEval.py`` of
  https://github.com/GT-Vision-Lab/VQA (``PythonEvaluationTools/vqaEvaluation``), which
  gives the punctuation, number-word, article and contraction rules and the
  leave-one-out soft accuracy;
* its EvalAI port, ``EvalAIAnswerProcessor`` in facebookresearch/mmf
  (``pythia/tasks/processors.py``, also used by LLaVA and lmms-eval to report VQAv2), whose
  table uses ASCII apostrophes and whose punctuation list treats ``!`` and ``-`` as
  punctuation but keeps ``'``, so that ``"dont"`` and ``"don't"`` normalise to the same
  string. :func:`normalize_answer` is that port.

The prediction and every reference go through :func:`normalize_answer`, as in the EvalAI port;
the official script gives the references only the punctuation step.

Soft accuracy (Antol et al., "VQA: Visual Question Answering", ICCV 2015, and the
official script): with the normalised prediction ``p`` and human answers ``a_1..a_n``,

    acc(p) = 1/n * sum_i  min(1, #{j != i : a_j == p} / 3)

i.e. "three humans agreeing makes an answer fully right", averaged over the ``n``
leave-one-out subsets of the ``n = 10`` collected answers. If ``k`` of the 10 humans gave
``p``, this is ``(k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10``: 0.3, 0.6, 0.9, 1.0
for ``k = 1, 2, 3, >=4``.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

AnswerMetric = Callable[[str, str | Sequence[str]], float]

# Number of answers collected per question in VQA v1/v2; the leave-one-out average is
# defined over exactly these subsets.
VQA_ANSWERS_PER_QUESTION = 10

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# The reference table, with ASCII apostrophes as in the EvalAI port. Its capitalised keys
# ("Im", "Ive", "Id've", "I'dve") can never match lower-cased words and its identity entries
# ("let's", "she's") change nothing, so both are left out.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    # (sic) the reference maps this contraction *away* from its apostrophe; kept so that
    # scores agree with it.
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)

# The reference writes "(?!<=\d)(\.)(?!\d)": a typo for a look-behind that is in fact a
# look-ahead for the text "<=digit", which can never follow a ".". What the official script
# therefore does is drop every period not followed by a digit ("3." -> "3", "yes." -> "yes")
# while keeping decimals ("2.5", ".5"). We write that behaviour directly.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    """Punctuation rule of ``processPunctuation``: a mark that touches a space somewhere in
    the answer is deleted everywhere ("yes !" -> "yes "), otherwise it becomes a space so
    that the words it joined stay apart ("red-white" -> "red white")."""
    stripped = text
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text:
            stripped = stripped.replace(mark, "")
        else:
            stripped = stripped.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", stripped)


def normalize_answer(answer: str) -> str:
    """Normalise a VQA answer the way the official evaluation does before comparing.

    Steps (see the module docstring for the references): lower-case; delete commas and
    question marks (``"1,000" -> "1000"``; the official script instead deletes every mark of
    an answer that holds such a number, which agrees on the number itself); split the
    possessive ``'s`` off its word; apply the punctuation rule of :func:`_strip_punctuation`
    and drop periods not followed by a digit; map number words to digits (``"two" -> "2"``);
    drop the articles a/an/the; restore the apostrophe of known contractions
    (``"dont" -> "don't"``); join with single spaces.

    Example: ``normalize_answer("Two dogs.") == "2 dogs"``.
    """
    if not isinstance(answer, str):
        raise ValueError(f"an answer must be a str, got {type(answer).__name__}: {answer!r}")
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _as_reference_list(references: str | Sequence[str]) -> list[str]:
    """A bare string is one reference, not a sequence of one-character references."""
    reference_list = [references] if isinstance(references, str) else list(references)
    if not reference_list:
        raise ValueError("references must hold at least one answer, got an empty sequence")
    return reference_list


def vqa_exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0.

    The right metric for single-answer datasets (easy-vqa, GQA-style), where the soft
    accuracy of :func:`vqa_accuracy` could never exceed 1/3.
    """
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(r) for r in _as_reference_list(references)))


def vqa_accuracy(
    prediction: str,
    references: str | Sequence[str],
    leave_one_out: bool | None = None,
) -> float:
    """Official VQA soft accuracy of one prediction against the human answers.

    ``acc = mean over i of min(1, #{j != i : ref_j == pred} / 3)`` when ``leave_one_out``,
    otherwise ``min(1, #{j : ref_j == pred} / 3)`` (the formula of Antol et al. 2015 without
    the subset average). ``leave_one_out=None`` applies the official protocol: the
    leave-one-out average exactly when the 10 answers of a VQA question are given.
    Prediction and references are compared after :func:`normalize_answer`.

    Example: 2 of 10 humans said "2" and the model said "two":
    ``(2 * 1/3 + 8 * 2/3) / 10 = 0.6``.
    """
    reference_list = _as_reference_list(references)
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(r) == predicted for r in reference_list]
    if leave_one_out is None:
        leave_one_out = len(reference_list) == VQA_ANSWERS_PER_QUESTION
    n_matching = sum(matches)
    if not leave_one_out:
        return min(1.0, n_matching / 3)
    if len(reference_list) < 2:
        raise ValueError(
            f"leave-one-out accuracy needs at least 2 reference answers, got {len(reference_list)}"
        )
    # Leaving out a matching answer removes one match; leaving out any other keeps them all.
    subset_scores = [min(1.0, (n_matching - is_match) / 3) for is_match in matches]
    return sum(subset_scores) / len(subset_scores)


ANSWER_METRICS: dict[str, AnswerMetric] = {
    "vqa_accuracy": vqa_accuracy,
    "exact_match": vqa_exact_match,
}


def _resolve_metric(metric: str | AnswerMetric) -> AnswerMetric:
    if callable(metric):
        return metric
    if metric not in ANSWER_METRICS:
        raise ValueError(f"unknown answer metric {metric!r}; expected one of {sorted(ANSWER_METRICS)}")
    return ANSWER_METRICS[metric]


def _per_question_scores(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    metric: str | AnswerMetric,
) -> list[float]:
    if isinstance(predictions, str):
        raise ValueError("predictions must be a sequence of answers, got a single str")
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists; "
            "expected one reference list per prediction"
        )
    if not predictions:
        raise ValueError("cannot average an accuracy over zero questions")
    metric_fn = _resolve_metric(metric)
    if metric_fn is vqa_accuracy:
        n_short = sum(1 for refs in references if len(_as_reference_list(refs)) < 3)
        if n_short:
            logger.warning(
                "%d of %d questions have fewer than 3 reference answers: their VQA soft accuracy "
                "cannot reach 1.0 (use metric='exact_match' for single-answer datasets)",
                n_short,
                len(references),
            )
    return [metric_fn(p, r) for p, r in zip(predictions, references)]


def mean_accuracy(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    metric: str | AnswerMetric = "vqa_accuracy",
) -> float:
    """Average of ``metric(prediction, references)`` over questions, in [0, 1].

    Args:
        predictions: one answer per question.
        references: per question, the human answers (a list) or a single answer (a str).
        metric: ``"vqa_accuracy"``, ``"exact_match"`` or any callable with that signature.
    """
    scores = _per_question_scores(predictions, references, metric)
    return sum(scores) / len(scores)


def accuracy_by_group(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    groups: Sequence[str],
    metric: str | AnswerMetric = "vqa_accuracy",
) -> dict[str, float]:
    """Mean accuracy per group (question type, answer type, ...), keys sorted.

    Watching accuracy per question type is how a language-prior plateau shows up: a model
    that ignores the image can score well on yes/no while shape questions sit at chance.
    """
    if len(groups) != len(predictions):
        raise ValueError(
            f"got {len(groups)} group labels for {len(predictions)} predictions; "
            "expected one group per prediction"
        )
    scores = _per_question_scores(predictions, references, metric)
    scores_by_group: dict[str, list[float]] = defaultdict(list)
    for group, score in zip(groups, scores):
        scores_by_group[group].append(score)
    return {group: sum(s) / len(s) for group, s in sorted(scores_by_group.items())}
