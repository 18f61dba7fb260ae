"""The evaluation runner: which metric each task gets, the prompts the model is asked, likelihood
scoring over each question type's answer set, and spec-level evaluation with retrieval recall."""

from __future__ import annotations

import functools

import pytest
import torch

import minivlm.generate
from minivlm.config import preset
from minivlm.data import build_dataset
from minivlm.eval.caption import bleu, cider
from minivlm.eval.runner import Prediction, answer_sets, evaluate, evaluate_spec, score
from minivlm.generate import continuation_logprobs
from minivlm.model import VisionLanguageModel
from minivlm.retrieval import attach_retrieval_head
from minivlm.train.recipe import attach_tokenizer, build_processor, build_tokenizer
from tinykit import TINY_PARTS

TINY = TINY_PARTS + (
    "decoder.n_layers=1", "decoder.max_seq_len=256", "data.max_length=256", "data.video_frames=2",
)


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def tiny_model() -> VisionLanguageModel:
    train = build_dataset("shapes", "train", seed=0, image_size=48)
    tokenizer = build_tokenizer([train[i] for i in range(200)], vocab_size=300)
    cfg = attach_tokenizer(preset("tiny").override(*TINY), tokenizer)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.5)
    model.processor = build_processor(cfg, tokenizer)
    return model


def sample(task, question_type, answer, question="What is it?"):
    return {"task": task, "question_type": question_type, "answer": answer, "id": f"{task}/{answer}",
            "messages": [{"role": "user", "content": [{"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def test_score_by_task_and_question_type():
    preds = [
        Prediction("easy_vqa", "color", "q", "red", "red", True),
        Prediction("easy_vqa", "color", "q", "blue", "red", False),
        Prediction("easy_vqa", "shape", "q", "circle", "circle", True),
        Prediction("charts", "max_value", "q", "7", "7", True),
        Prediction("shapes", "caption", "q", "a red circle", "a red circle", None),
        Prediction("shapes", "caption", "q", "two blue squares", "a blue square", None),
    ]
    metrics, counts = score(preds)
    assert metrics["easy_vqa/accuracy"] == pytest.approx(2 / 3) and counts["easy_vqa/accuracy"] == 3
    assert metrics["easy_vqa/color"] == 0.5 and metrics["easy_vqa/shape"] == 1.0
    assert metrics["charts/accuracy"] == 1.0 and "charts/max_value" not in metrics  # one type: no breakdown
    cands, refs = ["a red circle", "a blue square"], [["a red circle"], ["two blue squares"]]
    assert metrics["shapes/caption_bleu4"] == pytest.approx(bleu(cands, refs))
    assert metrics["shapes/caption_cider"] == pytest.approx(cider(cands, refs))
    assert "shapes/accuracy" not in metrics


def test_evaluate_asks_the_prompt_without_the_answer_and_normalises(monkeypatch):
    replies = {"Colour?": "Red.", "Shape?": "a circle", "How many?": "two", "Describe.": "a red circle"}
    asked = []

    def scripted_chat_batch(model, conversations, max_new_tokens):
        asked.extend(conversations)
        return [replies[c[-1]["content"][0]["text"]] for c in conversations]

    monkeypatch.setattr(minivlm.generate, "chat_batch", scripted_chat_batch)
    data = [sample("easy_vqa", "color", "red", "Colour?"), sample("easy_vqa", "shape", "circle", "Shape?"),
            sample("shapes", "count", "3", "How many?"), sample("shapes", "caption", "a red circle", "Describe.")]
    report = evaluate(object(), data, batch_size=3)
    assert asked == [s["messages"][:-1] for s in data]
    # "Red." normalises to "red"; "a circle" loses its article; "two" becomes "2", not "3".
    assert [p.correct for p in report.predictions] == [True, True, False, None]
    assert report.metrics["easy_vqa/accuracy"] == 1.0 and report.metrics["shapes/accuracy"] == 0.0
    assert report.to_dict(1)["predictions"][0]["prediction"] == "Red."


def test_answer_sets_split_by_task_and_type():
    data = [sample("easy_vqa", "color", "red"), sample("easy_vqa", "color", "blue"), sample("easy_vqa", "color", "red"),
            sample("easy_vqa", "shape", "circle"), sample("shapes", "caption", "a red circle")]
    assert answer_sets(data) == {("easy_vqa", "color"): ["blue", "red"], ("easy_vqa", "shape"): ["circle"]}


def test_likelihood_scoring_picks_the_most_likely_answer_of_the_type():
    model = tiny_model()
    data = build_dataset("multi_image", "test", seed=0, image_size=48)
    samples = [data[i] for i in range(30)]
    report = evaluate(model, samples, limit=4, scoring="likelihood")
    # The answer sets come from all 30 samples, not only the 4 scored ones.
    options = answer_sets(samples)
    assert len(options[("multi_image", "more")]) == 3
    for s, p in zip(samples, report.predictions):
        candidates = options[(s["task"], s["question_type"])]
        means = [lp.mean().item() for lp in continuation_logprobs(model, s["messages"][:-1], candidates)]
        assert p.prediction == candidates[max(range(len(means)), key=means.__getitem__)]
    assert len(report.predictions) == 4


def test_evaluate_spec_adds_retrieval_recall_for_models_with_a_head():
    model = tiny_model()
    without = evaluate_spec(model, "retrieval,video", limit=3, max_new_tokens=4)
    assert "retrieval/caption_bleu4" in without.metrics and "video/accuracy" in without.metrics
    assert not any("r@" in k for k in without.metrics)
    assert without.notes == ["retrieval: no recall@k: the model has no retrieval head (train one with "
                             "train.retrieval_weight > 0, or minivlm.retrieval.train_retrieval)"]
    assert without.to_dict()["notes"] == without.notes and without.table().endswith("note: " + without.notes[0])
    attach_retrieval_head(model)
    try:
        with_head = evaluate_spec(model, "retrieval,video", limit=3, max_new_tokens=4)
    finally:
        del model.retrieval_head
    assert {"retrieval/i2t_r@1", "retrieval/i2t_mean_rank", "retrieval/t2i_r@10"} <= set(with_head.metrics)
    assert with_head.counts["retrieval/t2i_r@5"] == 3
    assert with_head.metrics["retrieval/t2i_r@5"] == 1.0  # 3 candidates
    assert not any(k.startswith("video/") and "r@" in k for k in with_head.metrics)
    assert with_head.notes == []


@pytest.mark.parametrize("options, message", [({"scoring": "vote"}, "scoring must be"), ({"limit": 0}, "limit")])
def test_bad_evaluation_options(options, message):
    with pytest.raises(ValueError, match=message):
        evaluate(object(), [sample("easy_vqa", "color", "red")], **options)
