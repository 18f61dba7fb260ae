"""The CUDA training path never falls back to a math attention kernel without saying so.

Two ways attention can silently become the slow, memory-hungry math kernel:

* minivlm's own reference backend, ``math_attention`` (explicit ``[T, S]`` scores), reached by
  dispatch;
* PyTorch SDPA choosing its internal math kernel because the inputs or the mask rule out flash,
  memory-efficient and cuDNN attention.

The guard below makes both fail loudly: ``BACKENDS["math"]`` raises, and the step runs under
``torch.nn.attention.sdpa_kernel`` restricted to the fused SDPA kernels (SDPA raises when none of
them applies). It also records which backend served each mask kind, so the tests check the
dispatch table too: plain causal and ViT masks go to SDPA's flash kernel (no mask tensor), while
prefix-LM, packed-document and padded masks go to a block-sparse kernel (flex or triton).

The model runs forward and backward of a training step in bf16 autocast, as the trainer does on a
GPU. On CPU only the guard's own behaviour and the flash eligibility of plain masks are checked
(CPU SDPA has a flash kernel too); the block-sparse dispatch is a CUDA path.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from minivlm.config import preset
from minivlm.kernels.dispatch import BACKENDS
from minivlm.model import VisionLanguageModel
from minivlm.registry import image_seq_len

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="the block-sparse kernels (flex, compiled Triton) and bf16 flash attention are CUDA paths",
)

FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
BLOCK_SPARSE = {"flex", "triton"}


class MathAttentionReached(AssertionError):
    """minivlm's reference attention served a call on a path that must use a fused kernel."""


@dataclass
class AttentionCalls:
    """What the guarded step called: ``backends[(backend, mask kind)]`` and, for SDPA,
    ``sdpa["flag_only"]`` / ``sdpa["mask_tensor"]`` (whether an explicit mask was passed)."""

    backends: Counter = field(default_factory=Counter)
    sdpa: Counter = field(default_factory=Counter)


@contextlib.contextmanager
def no_math_attention(monkeypatch, sdpa_backends=FUSED_SDPA):
    """Record every attention call; fail on any math kernel (see the module docstring)."""
    calls = AttentionCalls()

    def recording(name, fn):
        def wrapper(q, k, v, mask, scale=None):
            calls.backends[(name, mask.kind)] += 1
            return fn(q, k, v, mask, scale=scale)

        return wrapper

    def forbidden(q, k, v, mask, scale=None):
        raise MathAttentionReached(f"math_attention served a {mask.kind!r} mask on {q.device}")

    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        has_mask = kwargs.get("attn_mask") is not None or (len(args) > 3 and args[3] is not None)
        calls.sdpa["mask_tensor" if has_mask else "flag_only"] += 1
        return sdpa(*args, **kwargs)

    for name, fn in list(BACKENDS.items()):
        monkeypatch.setitem(BACKENDS, name, forbidden if name == "math" else recording(name, fn))
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    with sdpa_kernel(sdpa_backends):
        yield calls


def _tiny(device, *overrides):
    config = preset("tiny").override(*overrides)
    with torch.device(device):
        return VisionLanguageModel(config).train()


def _batch(model, device, batch=2, text=32):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    placeholders = torch.full((batch, image_seq_len(cfg)), cfg.image_token_id)
    words = torch.randint(cfg.image_token_id + 1, cfg.decoder.vocab_size, (batch, text), generator=g)
    input_ids = torch.cat([placeholders, words], 1)
    labels = input_ids.clone()
    labels[:, : image_seq_len(cfg)] = -100
    pixels = torch.randn(batch, cfg.encoder.pixel_channels, cfg.encoder.image_size, cfg.encoder.image_size, generator=g)
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "pixel_values": pixels.to(device)}


def _train_step(model, inputs, dtype=torch.bfloat16):
    device_type = inputs["input_ids"].device.type
    with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
        out = model(**inputs, return_logits=False)
    out.loss.backward()
    return out


# -------------------------------------------------------------------------------------------
# CPU: the guard itself, and plain masks staying flash-eligible
# -------------------------------------------------------------------------------------------
def test_the_guard_fails_when_math_attention_serves_a_call(monkeypatch):
    model = _tiny("cpu")
    model.set_attention_backend("math")
    with pytest.raises(MathAttentionReached, match="math_attention served"):
        with no_math_attention(monkeypatch, [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
            _train_step(model, _batch(model, "cpu"), dtype=None)


def test_plain_causal_and_vit_masks_reach_sdpa_without_a_mask_tensor_on_cpu(monkeypatch):
    model = _tiny("cpu")
    with no_math_attention(monkeypatch, [SDPBackend.FLASH_ATTENTION]) as calls:
        _train_step(model, _batch(model, "cpu"), dtype=None)
    cfg = model.config
    assert calls.backends == Counter({("sdpa", "bidirectional"): cfg.encoder.depth,
                                      ("sdpa", "causal"): cfg.decoder.n_layers})
    assert calls.sdpa == Counter({"flag_only": cfg.encoder.depth + cfg.decoder.n_layers})


# -------------------------------------------------------------------------------------------
# CUDA: the training path
# -------------------------------------------------------------------------------------------
@needs_cuda
def test_plain_causal_training_step_uses_flash_only(monkeypatch):
    model = _tiny("cuda")
    with no_math_attention(monkeypatch, [SDPBackend.FLASH_ATTENTION]) as calls:
        _train_step(model, _batch(model, "cuda"))
    assert set(calls.backends) == {("sdpa", "bidirectional"), ("sdpa", "causal")}
    assert "mask_tensor" not in calls.sdpa


@needs_cuda
@pytest.mark.parametrize("scenario", ["prefix_lm", "documents", "padded_causal"])
def test_masked_training_steps_use_a_block_sparse_kernel(monkeypatch, scenario):
    model = _tiny("cuda", "fusion=prefix") if scenario == "prefix_lm" else _tiny("cuda")
    inputs = _batch(model, "cuda")
    if scenario == "documents":
        T = inputs["input_ids"].shape[1]
        inputs["document_ids"] = (torch.arange(T, device="cuda") >= T // 2).long().expand(2, T).contiguous()
        inputs["position_ids"] = torch.cat([torch.arange(T // 2), torch.arange(T - T // 2)]).cuda().expand(2, T)
    if scenario == "padded_causal":
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["attention_mask"][0, -5:] = 0
    with no_math_attention(monkeypatch) as calls:
        out = _train_step(model, inputs)
    assert torch.isfinite(out.loss)
    decoder_backends = {backend for backend, kind in calls.backends if kind == scenario}
    assert decoder_backends and decoder_backends <= BLOCK_SPARSE, calls.backends
    assert model.decoder.embed.weight.grad is not None
