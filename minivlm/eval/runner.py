"""Run a model over a dataset's test samples and score each task with its metric.

Closed-answer tasks (easy-VQA, shape questions, chart QA, multi-image and video questions) use
normalised exact match, broken down by ``question_type``; caption samples
(``question_type == "caption"``) use BLEU-4 and CIDEr-D against the reference caption.
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
    metrics: dict[str, float]  # "easy_vqa/accuracy", "easy_vqa/shape", "shapes/caption_cider", ...
    counts: dict[str, int]
    seconds: float
    predictions: list[Prediction] = field(default_factory=list)

    def table(self) -> str:
        width = max((len(k) for k in self.metrics), default=10)
        rows = [f"{'metric':<{width}}  {'value':>8}  {'n':>6}"]
        for k, v in self.metrics.items():
            rows.append(f"{k:<{width}}  {v:>8.4f}  {self.counts.get(k, 0):>6}")
        return "\n".join(rows)


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


def evaluate(model, dataset: Dataset | Sequence[dict[str, Any]], *, limit: int | None = None, batch_size: int = 64,
             max_new_tokens: int = 24, progress: bool = False) -> EvalReport:
    """Answer every sample greedily and score it. ``dataset`` items are chat samples."""
    from minivlm.generate import chat_batch

    n = len(dataset) if limit is None else min(limit, len(dataset))
    t0 = time.perf_counter()
    preds: list[Prediction] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="eval", unit="sample", dynamic_ncols=True)
    model.eval()
    for start in range(0, n, batch_size):
        samples = [dataset[i] for i in range(start, min(n, start + batch_size))]
        answers = chat_batch(model, [prompt_of(s) for s in samples], max_new_tokens=max_new_tokens)
        for s, a in zip(samples, answers):
            qtype = s.get("question_type") or "all"
            correct = None if qtype in CAPTION_TYPES else bool(vqa_exact_match(a, s["answer"]))
            preds.append(Prediction(s.get("task", "unknown"), qtype, question_of(s), s["answer"], a, correct))
        if bar is not None:
            bar.update(len(samples))
    if bar is not None:
        bar.close()
    metrics, counts = score(preds)
    return EvalReport(metrics, counts, time.perf_counter() - t0, preds)


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
                metrics[f"{task}/caption_cider"] = cider(cands, refs)
                counts[f"{task}/caption_cider"] = len(caps)
    return metrics, counts
