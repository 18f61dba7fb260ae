"""The loss of a step is normalised by the supervised tokens of the whole global batch.

Accumulating ``grad_accum`` micro-batches of ``B`` samples must give the gradient of one batch
of ``grad_accum * B`` samples with ``loss = sum over supervised tokens / their count``: a
sample's weight may not depend on how many tokens its micro-batch happened to hold.
"""

from __future__ import annotations

import pytest
import torch
import trainkit as tk

from minivlm.train.data import StepBatchSampler
from minivlm.train.trainer import Trainer


def _mixed_dataset() -> tk.ListDataset:
    """Image questions with one-word answers and text questions with answers of 2..12 words,
    so micro-batches differ a lot in supervised tokens."""
    images = list(tk.shapes_samples(8))
    colours = ("red", "blue", "green")
    texts = [tk.text_sample(f"list {k} colours", " ".join(colours[j % 3] for j in range(k))) for k in range(2, 14, 2)]
    return tk.ListDataset([s for pair in zip(images, texts + texts[:2]) for s in pair])


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(cfg, samples_per_micro: list[list[dict]]) -> tuple[dict, dict, float, list[int]]:
    """Gradients of the big batch's token-mean loss and of the mean of micro-batch means."""
    model = tk.model(cfg)
    big = tk.collate([s for micro in samples_per_micro for s in micro])
    out = model(**big, return_logits=False)
    (out.loss_sum / out.n_supervised).backward()
    global_grads, global_loss = _gradients(model), float(out.loss.detach())
    model.zero_grad()
    counts = []
    for micro in samples_per_micro:
        out = model(**tk.collate(micro), return_logits=False)
        (out.loss / len(samples_per_micro)).backward()
        counts.append(int(out.n_supervised))
    return global_grads, _gradients(model), global_loss, counts


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(("batch_size", "grad_accum"), [(3, 2), (2, 3), (1, 4)])
def test_accumulated_gradient_is_the_big_batch_gradient(tmp_path, batch_size, grad_accum, packing):
    cfg = tk.config(f"train.batch_size={batch_size}", f"train.grad_accum={grad_accum}", "train.steps=1",
                    "train.grad_clip=0", f"data.packing={packing}")
    data = _mixed_dataset()
    trainer = Trainer(tk.model(cfg), tk.processor(), data, tmp_path, dist=tk.cpu(), progress=False)
    captured = {}
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: captured.update(_gradients(trainer.model)))
    result = trainer.fit()

    sampler = StepBatchSampler(len(data), batch_size, grad_accum, seed=cfg.train.seed)
    micro = [[data[i] for i in sampler.indices(0, m)] for m in range(grad_accum)]
    global_grads, per_micro_grads, global_loss, counts = _reference(cfg, micro)
    assert len(set(counts)) > 1, "the micro-batches must differ in supervised tokens for this test to mean anything"
    assert result.history[0]["supervised_tokens"] == sum(counts)
    assert result.history[0]["loss"] == pytest.approx(global_loss, rel=1e-5)
    assert captured.keys() == global_grads.keys()
    for name, grad in global_grads.items():
        torch.testing.assert_close(captured[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # Averaging per-micro-batch means (the common mistake) gives a measurably different gradient.
    assert any(not torch.allclose(captured[n], per_micro_grads[n], rtol=1e-3, atol=1e-5) for n in global_grads)
