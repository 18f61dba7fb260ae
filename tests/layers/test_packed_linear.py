"""Stacked projections for decoding: inside a ``PackedLinears`` block (inference mode) each q/k/v
and gate/up group runs as one product with the same result as its separate layers; outside it,
with gradients, under LoRA or a hook, or above the size limit, the layers run as themselves."""
import pytest
import torch
from torch import nn

from minivlm import VisionLanguageModel, preset
from minivlm.decoders.llama import DecoderAttention
from minivlm.generate import GenerationConfig, generate
from minivlm.layers import packed_linear
from minivlm.layers.mlp import SwiGLU
from minivlm.layers.packed_linear import PackedLinears
from minivlm.train.lora import apply_lora


def tiny_model(seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return VisionLanguageModel(preset("tiny")).eval()


def groups(model):
    return [m for m in model.modules() if isinstance(m, (DecoderAttention, SwiGLU))]


def prompt(model, rows=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(model.config.image_token_id + 1, model.config.decoder.vocab_size, (rows, length), generator=g)


def test_packed_forward_matches_the_separate_layers():
    model = tiny_model()
    ids = prompt(model)
    with torch.inference_mode():
        separate = model(ids).logits
        with PackedLinears(model):
            assert all(m.packed is not None for m in groups(model))
            packed = model(ids).logits
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)


def test_stacks_are_attached_only_inside_the_block_and_never_with_gradients():
    model = tiny_model()
    packs = PackedLinears(model)
    with torch.inference_mode(), packs:
        assert all(m.packed is not None for m in groups(model))
    assert all(m.packed is None for m in groups(model))
    with packs:  # gradients enabled: a stack would cut them off from q, k, v, gate, up
        assert all(m.packed is None for m in groups(model))
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="boom"), packs:
            raise RuntimeError("boom")
    assert all(m.packed is None for m in groups(model))


def test_a_thread_training_while_another_decodes_keeps_its_gradients():
    import threading

    model = tiny_model()
    ids = prompt(model)
    entered, done = threading.Event(), threading.Event()

    def decode():  # holds the stacks attached, as a generation in another thread would
        with torch.inference_mode(), PackedLinears(model):
            entered.set()
            done.wait(timeout=60)

    other = threading.Thread(target=decode)
    other.start()
    try:
        assert entered.wait(timeout=60)
        assert all(m.packed is not None for m in groups(model))  # visible from this thread too
        model.train()
        model(ids).logits.square().mean().backward()  # this thread has gradients on
    finally:
        done.set()
        other.join()
    for m in groups(model):
        for name in type(m).packed_linears:
            grad = getattr(m, name).weight.grad
            assert grad is not None and grad.abs().sum() > 0, name


def test_generation_with_stacks_decodes_the_same_tokens():
    model = tiny_model(seed=3)
    ids = prompt(model, rows=3, length=7, seed=3)
    config = GenerationConfig(max_new_tokens=12)
    seen = []  # whether layer 1's attention ran stacked, call by call (a hook on the block, not on q/k/v)
    handle = model.decoder.layers[1].attn.register_forward_pre_hook(lambda m, args: seen.append(m.packed is not None))
    with_stacks = generate(model, ids, config=config).tokens
    handle.remove()
    assert seen == [True] * 12  # the prefill and 11 decode steps
    model.decoder.layers[0].attn.q.register_forward_hook(lambda *a: None)  # observed: q/k/v of layer 0 stay separate
    layer0 = PackedLinears(model)
    assert sum(isinstance(m, DecoderAttention) for m, _, _ in layer0._groups) == len(model.decoder.layers) - 1
    assert generate(model, ids, config=config).tokens == with_stacks


def test_weights_changed_in_place_are_restacked():
    model = tiny_model()
    ids = prompt(model)
    packs = PackedLinears(model)
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.attn.k.weight.mul_(1.5)
            layer.mlp.up.weight.mul_(0.5)
    with torch.inference_mode():
        expected = model(ids).logits
        with packs:
            got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lora_wrapped_layers_are_not_stacked():
    model = tiny_model()
    apply_lora(model, targets=("q", "v"))
    packed = {type(m).__name__ for m, _, _ in PackedLinears(model)._groups}
    assert packed == {"SwiGLU"}  # q and v are LoRA wrappers now; gate and up are still plain


def test_groups_above_the_size_limit_stay_separate(monkeypatch):
    model = tiny_model()
    attn = model.decoder.layers[0].attn
    qkv = sum(getattr(attn, n).weight.numel() for n in ("q", "k", "v"))
    monkeypatch.setattr(packed_linear, "MAX_STACK_ELEMENTS", qkv - 1)
    kinds = {type(m).__name__ for m, _, _ in PackedLinears(model)._groups}
    assert "DecoderAttention" not in kinds


def test_mixed_biases_are_not_stacked():
    mlp = SwiGLU(8, 16)
    mlp.gate = nn.Linear(8, 16, bias=True)
    assert PackedLinears(mlp)._groups == []
    both = SwiGLU(8, 16, bias=True)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        expected = both(x)
        with PackedLinears(both):
            assert both.packed[1] is not None and both.packed[1].shape == (32,)
            got = both(x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
