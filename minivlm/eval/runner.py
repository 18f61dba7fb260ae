"""Run a model over a dataset's test samples and score each task with its metric.

* Closed-answer tasks (easy-VQA, shape questions, chart QA, multi-image and video questions):
  normalised exact match (:func:`minivlm.eval.vqa.vqa_exact_match`), overall and per
  ``question_type``. Answers are generated greedily, or with ``scoring="likelihood"`` chosen
  among the task's answer set by log-likelihood (:mod:`minivlm.eval.choice`, the
  lm-evaluation-harness protocol), which measures what the model knows even when its free
  generation wanders.
* Captions (``question_type == "caption"``): corpus BLEU-4 and CIDEr-D against the reference.
* Image-caption pairs (samples with ``"image"`` and ``"caption"``, e.g. the ``retrieval`` task)
  of a model with a retrieval head: image->text and text->image recall@1/5/10
  (:func:`minivlm.retrieval.evaluate_retrieval`).

:func:`evaluate` scores one dataset; :func:`evaluate_spec` every source of a dataset spec
(``"easy_vqa,charts,retrieval"``), which is what ``minivlm eval`` runs.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from minivlm.eval.caption import bleu, cider
from minivlm.eval.vqa import vqa_exact_match

log = logging.getLogger(__name__)

CAPTION_TYPES = ("caption",)
SCORING_MODES = ("generate", "likelihood")
#: Likelihood scoring reads each question type's answer set from at least this many samples, so
#: that a small ``limit`` still chooses among every answer (a set of one would score 1.0 for free).
ANSWER_POOL = 500


@dataclass
class Prediction:
    task: str
    question_type: str
    question: str
    answer: str
    prediction: str
    correct: bool | None  # None for captions


@dataclass
class EvalReport:
    """Metrics keyed ``"<task>/<metric>"`` (``"easy_vqa/accuracy"``, ``"easy_vqa/shape"``,
    ``"shapes/caption_cider"``, ``"retrieval/t2i_r@5"``), the number of samples behind each,
    the seconds spent, and the individual predictions."""

    metrics: dict[str, float]
    counts: dict[str, int]
    seconds: float
    predictions: list[Prediction] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why a metric one would expect is missing

    def table(self) -> str:
        width = max((len(k) for k in self.metrics), default=10)
        rows = [f"{'metric':<{width}}  {'value':>8}  {'n':>6}"]
        for k, v in self.metrics.items():
            rows.append(f"{k:<{width}}  {v:>8.4f}  {self.counts.get(k, 0):>6}")
        rows += [f"note: {note}" for note in self.notes]
        return "\n".join(rows)

    def to_dict(self, n_predictions: int = 0) -> dict[str, Any]:
        """JSON-ready ``{"metrics", "counts", "seconds", "notes", "predictions"}`` with the first ``n_predictions``."""
        return {"metrics": self.metrics, "counts": self.counts, "seconds": self.seconds, "notes": self.notes,
                "predictions": [p.__dict__ for p in self.predictions[:n_predictions]]}


def prompt_of(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation up to (not including) its final assistant turn."""
    messages = sample["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(f"sample {sample.get('id')!r} does not end with an assistant turn to compare against")
    return messages[:-1]


def question_of(sample: dict[str, Any]) -> str:
    content = prompt_of(sample)[-1]["content"]
    if isinstance(content, str):
        return content
    return " ".join(item["text"] for item in content if item.get("type") == "text")


def answer_sets(samples: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[str]]:
    """The closed answer set of each ``(task, question_type)``: the distinct reference answers
    of ``samples``, sorted. The synthetic tasks draw answers uniformly, so a few hundred test
    samples cover each set (easy-VQA: its 13 answers split by type, the chart values 0-10)."""
    sets: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s in samples:
        qtype = s.get("question_type") or "all"
        if qtype not in CAPTION_TYPES:
            sets[(s.get("task", "unknown"), qtype)].add(s["answer"])
    return {key: sorted(answers) for key, answers in sets.items()}


def evaluate(model, dataset: Dataset | Sequence[dict[str, Any]], *, limit: int | None = None, batch_size: int = 64,
             max_new_tokens: int = 24, scoring: str = "generate", progress: bool = False) -> EvalReport:
    """Answer every sample and score it (see the module docstring). ``dataset`` items are chat samples.

    Args:
        limit: score the first ``limit`` samples only.
        batch_size: conversations generated together (left-padded).
        max_new_tokens: longest generated answer.
        scoring: ``"generate"`` (greedy answers) or ``"likelihood"`` (closed-answer samples pick
            the most likely answer of their question type, the set read from the first
            ``ANSWER_POOL`` samples; captions are still generated).
    """
    if scoring not in SCORING_MODES:
        raise ValueError(f"scoring must be one of {SCORING_MODES}, got {scoring!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    from minivlm.generate import chat_batch

    n = len(dataset) if limit is None else min(limit, len(dataset))
    t0 = time.perf_counter()
    samples = [dataset[i] for i in range(n)]
    options = {}
    if scoring == "likelihood":
        pool = samples + [dataset[i] for i in range(n, min(len(dataset), ANSWER_POOL))]
        options = answer_sets(pool)
    preds: list[Prediction] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="eval", unit="sample", dynamic_ncols=True)
    for start in range(0, n, batch_size):
        chunk = samples[start : start + batch_size]
        answers: dict[int, str] = {}
        if options:
            for i, s in enumerate(chunk):
                key = (s.get("task", "unknown"), s.get("question_type") or "all")
                if key in options:
                    answers[i] = _most_likely(model, s, options[key])
        to_generate = [i for i in range(len(chunk)) if i not in answers]
        if to_generate:
            generated = chat_batch(model, [prompt_of(chunk[i]) for i in to_generate], max_new_tokens=max_new_tokens)
            answers.update(zip(to_generate, generated))
        for i, s in enumerate(chunk):
            qtype = s.get("question_type") or "all"
            correct = None if qtype in CAPTION_TYPES else bool(vqa_exact_match(answers[i], s["answer"]))
            preds.append(Prediction(s.get("task", "unknown"), qtype, question_of(s), s["answer"], answers[i], correct))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    metrics, counts = score(preds)
    return EvalReport(metrics, counts, time.perf_counter() - t0, preds)


def _most_likely(model, sample: dict[str, Any], options: list[str]) -> str:
    """The option with the highest mean token log-probability as the reply to the sample's prompt."""
    from minivlm.eval.choice import pick_option
    from minivlm.generate import continuation_logprobs

    logprobs = dict(zip(options, continuation_logprobs(model, prompt_of(sample), options)))
    return options[pick_option(lambda _prompt, option: logprobs[option], question_of(sample), options)]


def score(preds: Sequence[Prediction]) -> tuple[dict[str, float], dict[str, int]]:
    """Per-task accuracy (overall and per question type) and caption BLEU-4 / CIDEr-D."""
    by_task: dict[str, list[Prediction]] = defaultdict(list)
    for p in preds:
        by_task[p.task].append(p)
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    for task, ps in sorted(by_task.items()):
        closed = [p for p in ps if p.correct is not None]
        if closed:
            metrics[f"{task}/accuracy"] = sum(p.correct for p in closed) / len(closed)
            counts[f"{task}/accuracy"] = len(closed)
            types = sorted({p.question_type for p in closed})
            if len(types) > 1:
                for t in types:
                    sel = [p for p in closed if p.question_type == t]
                    metrics[f"{task}/{t}"] = sum(p.correct for p in sel) / len(sel)
                    counts[f"{task}/{t}"] = len(sel)
        caps = [p for p in ps if p.correct is None]
        if caps:
            cands, refs = [p.prediction for p in caps], [[p.answer] for p in caps]
            metrics[f"{task}/caption_bleu4"] = bleu(cands, refs)
            counts[f"{task}/caption_bleu4"] = len(caps)
            if len(caps) > 1:
                # CIDEr's IDF weights come from the reference corpus: one caption has none.
                metrics[f"{task}/caption_cider"] = cider(cands, refs)
                counts[f"{task}/caption_cider"] = len(caps)
    return metrics, counts


def has_image_caption_pairs(dataset: Dataset | Sequence[dict[str, Any]]) -> bool:
    return len(dataset) > 0 and {"image", "caption"} <= set(dataset[0])


def evaluate_spec(model, spec: str, *, split: str = "test", limit: int | None = None, seed: int = 0,
                  batch_size: int = 64, max_new_tokens: int = 24, scoring: str = "generate",
                  progress: bool = False) -> EvalReport:
    """Evaluate every source of a dataset spec separately (weights are ignored) on ``split``.

    Each source gets its generation metrics; image-caption sources also get retrieval recall@k
    when the model has a retrieval head. Synthetic images are rendered at the encoder's size.
    """
    from minivlm.data import build_dataset, parse_spec

    preds: list[Prediction] = []
    retrieval_metrics: dict[str, float] = {}
    retrieval_counts: dict[str, int] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    for source in parse_spec(spec):
        dataset = build_dataset(source.label, split, seed=seed, image_size=model.config.encoder.image_size)
        log.info("evaluating %s (%s split, %d samples)", source.label, split,
                 len(dataset) if limit is None else min(limit, len(dataset)))
        report = evaluate(model, dataset, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          scoring=scoring, progress=progress)
        preds.extend(report.predictions)
        found, found_counts, note = retrieval_scores(model, source.name, dataset, limit)
        retrieval_metrics |= found
        retrieval_counts |= found_counts
        notes += [note] if note else []
    metrics, counts = score(preds)
    return EvalReport(metrics | retrieval_metrics, counts | retrieval_counts, time.perf_counter() - t0, preds, notes)


def retrieval_scores(model, name: str, dataset, limit: int | None = None
                     ) -> tuple[dict[str, float], dict[str, int], str | None]:
    """Recall@k metrics (keyed ``"<name>/<metric>"``) and their counts for a source of image-caption
    pairs; for a model without a retrieval head, none and a note saying why."""
    if not has_image_caption_pairs(dataset):
        return {}, {}, None
    if getattr(model, "retrieval_head", None) is None:
        return {}, {}, (f"{name}: no recall@k: the model has no retrieval head (train one with "
                        f"train.retrieval_weight > 0, or minivlm.retrieval.train_retrieval)")
    found = evaluate_retrieval(model, dataset, limit=limit)
    n = int(found.pop("n"))
    return ({f"{name}/{k}": v for k, v in found.items()}, {f"{name}/{k}": n for k in found}, None)


def evaluate_retrieval(model, dataset, *, limit: int | None = None, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image recall@k and ranks over the first ``limit`` image-caption pairs of
    ``dataset``, embedded with the model's retrieval head (:mod:`minivlm.retrieval`).

    Returns :func:`minivlm.eval.retrieval.retrieval_metrics`'s dict, plus ``"n"``.
    """
    from minivlm.eval.retrieval import retrieval_metrics
    from minivlm.retrieval import embed_images, embed_texts, image_and_caption

    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n < 1:
        raise ValueError("evaluate_retrieval needs at least one image-caption pair")
    images, captions = zip(*(image_and_caption(dataset[i]) for i in range(n)))
    metrics = retrieval_metrics(embed_images(model, images), embed_texts(model, list(captions)), ks=ks)
    metrics["n"] = float(n)
    return metrics
