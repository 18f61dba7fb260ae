"""``train.loss_weighting``: how much each sample's tokens weigh in the loss.

* ``token``: every supervised token counts once, so a long answer outweighs a short one (and the
  collator adds nothing to the batch);
* ``sample``: the loss is the mean, over samples, of each sample's mean token loss;
* ``square``: a sample with ``n`` supervised tokens weighs ``sqrt(n)`` (InternVL 2.5).

A grouped item (several questions about one image, merged into one shared-prefix sequence) is
one sample. The weighted loss is normalised over the whole global batch like the token mean, so
accumulation still gives the big batch's gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import trainkit as tk

from minivlm.config import ConfigError
from minivlm.data.collate import merge_shared_prefix
from minivlm.train.data import RenderedGroup, StepBatchSampler, TrainCollator, supervised_tokens, supervised_weight
from minivlm.train.loss_weighting import sample_loss_weight
from minivlm.train.trainer import MODEL_INPUTS, Trainer


def _samples() -> list[dict]:
    """Image questions with short answers and text questions with answers of 2..10 words."""
    images = list(tk.shapes_samples(3))
    texts = [tk.text_sample(f"list {k} colours", " ".join(["red", "blue", "green"][j % 3] for j in range(k)))
             for k in (2, 6, 10)]
    return [s for pair in zip(images, texts) for s in pair]


def _group(n_questions: int = 3) -> list[dict]:
    """Several questions about one image, answers of different lengths."""
    image = tk.shapes_samples(1)[0]["messages"][0]["content"][0]
    return [{"messages": [{"role": "user", "content": [image, {"type": "text", "text": f"question {k}?"}]},
                          {"role": "assistant", "content": " ".join(["yes"] * (1 + 3 * k))}]}
            for k in range(n_questions)]


def _render(samples: list[dict]) -> list:
    return [tk.processor().render(s["messages"], for_training=True) for s in samples]


def _collator(weighting: str, packed: bool) -> TrainCollator:
    tok = tk.processor().tokenizer
    return TrainCollator(tok.pad_id, 256 if packed else None, tok.image_token_id, weighting)


def _loss(model, batch: dict) -> torch.Tensor:
    return model(**{k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}, return_logits=False).loss


@pytest.mark.parametrize(("weighting", "n", "expected"), [
    ("token", 7, 1.0), ("sample", 4, 0.25), ("square", 4, 0.5), ("square", 2, 1 / math.sqrt(2)),
    ("sample", 0, 0.0), ("square", 0, 0.0),
])
def test_weight_of_each_token(weighting, n, expected):
    assert sample_loss_weight(n, weighting) == pytest.approx(expected)


def test_unknown_weightings_are_refused_up_front():
    with pytest.raises(ValueError, match=r"one of \('token', 'sample', 'square'\); got 'median'"):
        sample_loss_weight(3, "median")
    with pytest.raises(ValueError, match="'median'"):
        TrainCollator(0, None, 4, "median")
    with pytest.raises(ValueError, match="-1 supervised"):
        sample_loss_weight(-1, "sample")
    with pytest.raises(ConfigError, match="train.loss_weighting: expected token | sample | square, got 'mean'"):
        tk.config("train.loss_weighting=mean").validate()


def test_token_weighting_adds_no_tensor_to_the_batch():
    batch = _collator("token", packed=True)(_render(_samples()))
    assert "loss_weights" not in batch
    assert supervised_weight(batch) == supervised_tokens(batch)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_sample_weighting_is_the_mean_of_each_samples_mean(packed, fused):
    cfg = tk.config(f"train.fused_loss={fused}")
    model = tk.model(cfg)
    samples = _samples()
    batch = _collator("sample", packed)(_render(samples))
    assert supervised_weight(batch) == pytest.approx(len(samples))  # every sample weighs 1 in total
    with torch.no_grad():
        per_sample = [_loss(model, tk.collate([s])) for s in samples]
        token_mean = _loss(model, tk.collate(samples))
        weighted = _loss(model, batch)
    torch.testing.assert_close(weighted, torch.stack(per_sample).mean(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weighted, token_mean, rtol=1e-3)  # the long text answers dominate that one


def test_square_weighting_weighs_a_sample_by_the_root_of_its_length():
    model = tk.model(tk.config())
    samples = _samples()
    rendered = _render(samples)
    batch = _collator("square", packed=True)(rendered)
    with torch.no_grad():
        means = torch.stack([_loss(model, tk.collate([s])) for s in samples])
        weighted = _loss(model, batch)
    # Tokens a sample's loss counts: its labels after the one-position shift.
    sizes = torch.tensor([float(supervised_tokens(tk.collate([s]))) for s in samples])
    assert sizes.tolist() == [r.n_supervised for r in rendered]
    expected = (means * sizes.sqrt()).sum() / sizes.sqrt().sum()
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=1e-6)
    assert supervised_weight(batch) == pytest.approx(float(sizes.sqrt().sum()), rel=1e-6)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_group_of_questions_is_one_sample(packed):
    model = tk.model(tk.config())
    group, single = _group(), _samples()[1]
    rendered_group = RenderedGroup(_render(group), [])
    batch = _collator("sample", packed)([rendered_group, *_render([single])])
    assert "branch_ids" in batch  # merged into one shared-prefix sequence
    assert batch["n_samples"] == len(group) + 1
    assert supervised_weight(batch) == pytest.approx(2.0)  # the group and the single sample
    with torch.no_grad():
        group_mean = _loss(model, tk.collate(group))  # the group's own token mean
        expected = (group_mean + _loss(model, tk.collate([single]))) / 2
        torch.testing.assert_close(_loss(model, batch), expected, rtol=1e-5, atol=1e-6)


def test_a_group_split_over_pack_rows_still_weighs_one_sample():
    group = _render(_group(12))
    whole = merge_shared_prefix(group, tk.processor().tokenizer.image_token_id)
    tok = tk.processor().tokenizer
    pack_length = len(whole["input_ids"]) * 2 // 3
    batch = TrainCollator(tok.pad_id, pack_length, tok.image_token_id, "sample")([RenderedGroup(group, [])])
    assert batch["input_ids"].shape[0] >= 2  # split over rows
    assert batch["input_ids"].shape[1] == pack_length
    assert supervised_weight(batch) == pytest.approx(1.0)
    assert supervised_tokens(batch) == sum(g.n_supervised for g in group)


def test_model_refuses_weights_of_another_shape():
    model = tk.model(tk.config())
    batch = tk.collate(_samples()[:2])
    with pytest.raises(ValueError, match=r"loss_weights must match labels \[2, \d+\]; got \[2, 3\]"):
        model(**batch, loss_weights=torch.ones(2, 3))


@pytest.mark.parametrize("weighting", ["sample", "square"])
def test_accumulated_weighted_gradient_is_the_big_batch_gradient(tmp_path, weighting):
    data = tk.ListDataset(_samples())
    grads, losses = [], []
    for batch_size, grad_accum in ((6, 1), (2, 3)):
        cfg = tk.config(f"train.batch_size={batch_size}", f"train.grad_accum={grad_accum}", "train.steps=1",
                        "train.grad_clip=0", f"train.loss_weighting={weighting}")
        trainer = Trainer(tk.model(cfg), tk.processor(), data, tmp_path / f"{batch_size}x{grad_accum}",
                          dist=tk.cpu(), progress=False)
        captured = {}
        trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs, c=captured, t=trainer: c.update(
            {n: p.grad.detach().clone() for n, p in t.model.named_parameters() if p.grad is not None}))
        losses.append(trainer.fit().history[0]["loss"])
        grads.append(captured)
    # The whole dataset is the one global batch: its weighted loss, however it is split.
    model = tk.model(tk.config())
    assert sorted(StepBatchSampler(len(data), 6, 1, seed=cfg.train.seed).indices(0, 0)) == list(range(6))
    with torch.no_grad():
        means = torch.stack([_loss(model, tk.collate([s])) for s in data.samples])
        sizes = torch.tensor([float(supervised_tokens(tk.collate([s]))) for s in data.samples])
    w = sizes.sqrt() if weighting == "square" else torch.ones_like(sizes)
    assert losses[0] == pytest.approx(float((means * w).sum() / w.sum()), rel=1e-5)
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
