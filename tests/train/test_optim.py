"""AdamW parameter groups and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import trainkit as tk
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.config import TrainConfig
from minivlm.train.lora import apply_lora
from minivlm.train.optim import build_optimizer, lr_multiplier, param_groups
from minivlm.train.trainer import Trainer


def test_warmup_then_cosine_by_hand():
    cfg = TrainConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    values = [lr_multiplier(s, 12, cfg) for s in range(13)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0)
    assert values[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))  # 0.8682
    assert values[8] == pytest.approx(0.55)
    assert values[12] == pytest.approx(0.1)


def test_warmup_then_linear_by_hand():
    cfg = TrainConfig(warmup_steps=2, schedule="linear", min_lr_ratio=0.0)
    assert [lr_multiplier(s, 10, cfg) for s in range(11)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0])


def test_constant_schedule_and_no_warmup():
    cfg = TrainConfig(warmup_steps=0, schedule="constant")
    assert {lr_multiplier(s, 5, cfg) for s in range(5)} == {1.0}


@settings(max_examples=40, deadline=None)
@given(warmup=st.integers(0, 20), total=st.integers(1, 200), ratio=st.floats(0, 1),
       schedule=st.sampled_from(["cosine", "linear", "constant"]))
def test_schedule_rises_then_never_rises_and_stays_in_range(warmup, total, ratio, schedule):
    cfg = TrainConfig(warmup_steps=warmup, schedule=schedule, min_lr_ratio=ratio)
    values = [lr_multiplier(s, total, cfg) for s in range(total + 1)]
    rising, decaying = values[:warmup], values[warmup:]
    assert all(a < b for a, b in zip(rising, rising[1:]))
    assert all(a >= b - 1e-12 for a, b in zip(decaying, decaying[1:]))
    assert all(min(ratio, 1 / max(warmup, 1)) - 1e-12 <= v <= 1 + 1e-12 for v in values)


def test_the_trainer_logs_the_learning_rate_of_each_step(tmp_path):
    cfg = tk.config("train.steps=6", "train.warmup_steps=2", "train.lr=1e-3", "train.schedule=cosine")
    result = Trainer(tk.model(cfg), tk.processor(), tk.dataset(), tmp_path, dist=tk.cpu(), progress=False).fit()
    expected = [1e-3 * lr_multiplier(s, 6, cfg.train) for s in range(6)]
    assert [h["lr"] for h in result.history] == pytest.approx(expected)


def test_matrices_decay_and_gains_biases_positions_do_not():
    model = tk.model(tk.config())
    groups = {g["name"]: g for g in param_groups(model, {}, TrainConfig(weight_decay=0.1))}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups.values() if g["weight_decay"] == 0.1 for p in g["params"]}
    assert "encoder.pos_embed" in no_decay and "decoder.norm.weight" in no_decay
    assert "decoder.layers.0.attn.q.weight" in decay and "decoder.embed.weight" in decay
    assert all(p.ndim >= 2 for g in groups.values() if g["weight_decay"] for p in g["params"])
    # The tied LM head is the embedding: one parameter, one group.
    assert sum(len(g["params"]) for g in groups.values()) == len({id(p) for p in model.parameters()})


def test_lora_adapters_get_their_own_group_at_the_base_learning_rate():
    model = tk.model(tk.config())
    apply_lora(model, r=2)
    groups = param_groups(model, {"projector": 0.5, "decoder": 0.0}, TrainConfig(lr=1e-3))
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["lora/decay"] == pytest.approx(1e-3)
    assert lrs["projector/decay"] == pytest.approx(5e-4)
    assert not any(name.startswith(("decoder/", "encoder/")) for name in lrs)


def test_an_all_frozen_model_cannot_build_an_optimizer():
    model = tk.model(tk.config()).freeze()
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, {}, TrainConfig(), tk.model(tk.config()).device)


def test_the_cpu_optimizer_is_the_fused_adamw_kernel():
    model = tk.model(tk.config())
    optimizer = build_optimizer(model, {}, TrainConfig(), torch.device("cpu"))
    assert all(group["fused"] for group in optimizer.param_groups)


def test_fused_adamw_gives_the_weights_of_the_unfused_one_after_five_steps():
    """The fused kernel is a speed choice only: same update rule, same weights within float rounding."""
    torch.manual_seed(0)
    reference = tk.model(tk.config())
    models = {fused: copy.deepcopy(reference) for fused in (False, True)}
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    optimizers = {fused: torch.optim.AdamW(param_groups(m, {}, cfg), lr=cfg.lr, betas=cfg.betas, fused=fused)
                  for fused, m in models.items()}
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=generator) for p in reference.parameters()]
        for fused, model in models.items():
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizers[fused].step()
    for (name, a), b in zip(models[False].named_parameters(), models[True].parameters()):
        assert not torch.equal(a, dict(reference.named_parameters())[name])  # the weights did move
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
