"""Every linear layer of a fresh VisionLanguageModel starts LeCun-normal: N(0, 1/fan_in), bias 0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minivlm.config import preset
from minivlm.layers.init import init_linear_
from minivlm.model import VisionLanguageModel


def test_init_linear_scales_by_fan_in():
    torch.manual_seed(0)
    layer = init_linear_(nn.Sequential(nn.Linear(400, 300), nn.Linear(100, 500, bias=False)))
    for linear in (layer[0], layer[1]):
        std = linear.weight.std().item()
        assert std == pytest.approx(linear.in_features**-0.5, rel=0.03)
        assert abs(linear.weight.mean().item()) < 0.1 * std
    assert torch.count_nonzero(layer[0].bias) == 0


def test_model_linear_layers_are_lecun_normal_and_special_cases_are_kept():
    torch.manual_seed(0)
    model = VisionLanguageModel(preset("tiny").override("fusion=cross_attention", "fusion.every=2"))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears
    for linear in linears:
        if linear.weight.numel() >= 10_000:
            assert linear.weight.std().item() == pytest.approx(linear.in_features**-0.5, rel=0.1)
        if linear.bias is not None:
            assert torch.count_nonzero(linear.bias) == 0
    # Not linear layers, so untouched: the token embedding scale and the closed cross-attention gates.
    width = model.config.decoder.width
    assert model.decoder.embed.weight.std().item() == pytest.approx(width**-0.5, rel=0.05)
    gates = [p for name, p in model.fusion.named_parameters() if "gate" in name and p.ndim <= 1]
    assert gates and all(torch.count_nonzero(g) == 0 for g in gates)
