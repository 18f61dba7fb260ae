"""minivlm.layers.norms.LayerNorm: PyTorch's layer norm, normalised in fp32 for half-precision input."""

import pytest
import torch
from torch import nn

from minivlm.layers.norms import LayerNorm


def _pair(dim: int = 64, seed: int = 0) -> tuple[LayerNorm, nn.LayerNorm]:
    torch.manual_seed(seed)
    ours, theirs = LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_(1.0, 0.2)
        ours.bias.normal_(0.0, 0.2)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def test_is_an_nn_layer_norm_with_the_same_state_dict():
    # Converters (timm, open_clip, SigLIP checkpoints) check for an affine nn.LayerNorm and map
    # `weight` / `bias` by name.
    ours, theirs = _pair()
    assert isinstance(ours, nn.LayerNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_fp32_input_is_pytorchs_layer_norm_bit_for_bit():
    ours, theirs = _pair()
    x = torch.randn(3, 7, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.testing.assert_close(ours(x), theirs(x2), rtol=0, atol=0)
    g = torch.randn(3, 7, 64)
    ours(x).backward(g)
    theirs(x2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_keeps_its_dtype_and_matches_fp32(dtype):
    ours, theirs = _pair()
    x = torch.randn(5, 64) * 3 + 1
    y = ours(x.to(dtype))
    assert y.dtype == dtype
    # One rounding of the fp32 result to the half type.
    torch.testing.assert_close(y.float(), theirs(x.to(dtype).float()).to(dtype).float(), rtol=0, atol=0)


def test_bf16_weight_and_bias_gradients_are_fp32_accurate():
    # Many rows, as an encoder's norm sees them (images x patches): the gradients of weight and bias
    # are sums over all rows, and it is their accumulation that a bf16 input must not degrade.
    ours, theirs = _pair(dim=128, seed=1)
    torch.manual_seed(2)
    x = (torch.randn(8192, 128) * 2 + 0.5).bfloat16()
    g = torch.randn(8192, 128).bfloat16()
    ours(x).backward(g)
    theirs(x.float()).backward(g.float())  # the reference: the same bf16 values, in fp32
    for name in ("weight", "bias"):
        ref = getattr(theirs, name).grad
        err = (getattr(ours, name).grad - ref).norm() / ref.norm()
        assert err < 2e-3, (name, err.item())
    x_ours = x.clone().requires_grad_()
    x_ref = x.float().requires_grad_()
    ours(x_ours).backward(g)
    theirs(x_ref).backward(g.float())
    assert x_ours.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x_ours.grad.float(), x_ref.grad, rtol=2e-2, atol=2e-2)


def test_without_affine_parameters():
    for kwargs in ({"elementwise_affine": False}, {"bias": False}):
        ours, theirs = LayerNorm(16, **kwargs), nn.LayerNorm(16, **kwargs)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(4, 16)
        torch.testing.assert_close(ours(x.bfloat16()).float(), theirs(x.bfloat16().float()).bfloat16().float())


def test_under_cpu_bf16_autocast_the_encoder_norm_gradients_stay_accurate():
    # The case that motivated it: autocast on the CPU hands layer norms bf16 activations.
    torch.manual_seed(3)
    lin, ours = nn.Linear(128, 128), LayerNorm(128)
    x = torch.randn(4096, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        assert h.dtype == torch.bfloat16
        y = ours(h)
    (y.float() * torch.linspace(-1, 1, 128)).sum().backward()
    reference = nn.LayerNorm(128)
    reference.load_state_dict(ours.state_dict())
    (reference(h.detach().float()) * torch.linspace(-1, 1, 128)).sum().backward()
    err = (ours.weight.grad - reference.weight.grad).norm() / reference.weight.grad.norm()
    assert err < 2e-3, err.item()
