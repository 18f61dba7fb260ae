"""Packed projections for decoding: inside a ``PackedLinears`` block (inference mode) each q/k/v
and gate/up group runs as one product, and o, down and the LM head as products with transposed
weights, with the same result as the separate layers; outside it, with gradients, under LoRA or a
hook, or above the size limit, the layers run as themselves. A model keeps its packed weights
between generations while they stay valid."""
import pytest
import torch
from torch import nn

from minivlm import VisionLanguageModel, preset
from minivlm.decoders.llama import DecoderAttention, LlamaDecoder
from minivlm.generate import GenerationConfig, generate
from minivlm.layers.mlp import SwiGLU
from minivlm.layers.packed_linear import PackedLinears, PackedWeight, packed_linear
from minivlm.train.lora import apply_lora


def tiny_model(seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return VisionLanguageModel(preset("tiny")).eval()


def groups(model):
    return [m for m in model.modules() if isinstance(m, (DecoderAttention, SwiGLU, LlamaDecoder))]


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
        for name in (name for names in type(m).packed_linears for name in names):
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
    assert sum(isinstance(m, DecoderAttention) for m in layer0.packed_modules) == len(model.decoder.layers) - 1
    assert generate(model, ids, config=config).tokens == with_stacks


def test_weights_changed_in_place_are_restacked():
    model = tiny_model()
    ids = prompt(model)
    packs = PackedLinears(model)
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.attn.k.weight.mul_(1.5)
            layer.mlp.up.weight.mul_(0.5)
            layer.mlp_norm.weight.mul_(0.8)  # folded into gate/up: re-folded too
    with torch.inference_mode():
        expected = model(ids).logits
        with packs:
            got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lora_wrapped_layers_are_not_stacked():
    model = tiny_model()
    apply_lora(model, targets=("q", "v"))
    packed = {type(m).__name__ for m in PackedLinears(model).packed_modules}
    assert packed == {"SwiGLU", "LlamaDecoder"}  # q and v are LoRA wrappers now; the MLPs and the head are plain


def test_groups_above_the_size_limit_stay_separate(monkeypatch):
    model = tiny_model()
    attn = model.decoder.layers[0].attn
    qkv = sum(getattr(attn, n).weight.numel() for n in ("q", "k", "v"))
    monkeypatch.setattr("minivlm.layers.packed_linear.MAX_STACK_ELEMENTS", qkv - 1)
    kinds = {type(m).__name__ for m in PackedLinears(model).packed_modules}
    assert "DecoderAttention" not in kinds


def test_mixed_biases_are_not_stacked():
    mlp = SwiGLU(8, 16)
    mlp.gate = nn.Linear(8, 16, bias=True)
    assert PackedLinears(mlp).packed_modules == []
    both = SwiGLU(8, 16, bias=True)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        expected = both(x)
        with PackedLinears(both):
            assert both.packed[0].bias is not None and both.packed[0].bias.shape == (32,)
            got = both(x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_packed_weights_are_stored_transposed_and_match_each_layer():
    """q/k/v and gate/up also carry the RMSNorm before them (folded); o, down and the head do not."""
    model = tiny_model()
    block = model.decoder.layers[0]
    attn, mlp = block.attn, block.mlp
    with torch.no_grad():  # a norm weight other than ones, so folding it shows
        block.attn_norm.weight.uniform_(0.5, 1.5)
        block.mlp_norm.weight.uniform_(0.5, 1.5)
    with torch.inference_mode(), PackedLinears(model):
        assert block.packed is True
        qkv, o = attn.packed
        gate_up, down = mlp.packed
        (head,) = model.decoder.packed
        D = model.config.decoder.width
        assert qkv.weight_t.shape == (D, attn.q.out_features + attn.k.out_features + attn.v.out_features)
        assert all(p.weight_t.is_contiguous() for p in (qkv, o, gate_up, down, head))
        assert head.weight_t.shape == (D, model.config.decoder.vocab_size)
        assert [p.rms_eps is not None for p in (qkv, o, gate_up, down, head)] == [True, False, True, False, False]
        x = torch.randn(3, D) * 4
        for packed, norm, layers in ((qkv, block.attn_norm, (attn.q, attn.k, attn.v)),
                                     (gate_up, block.mlp_norm, (mlp.gate, mlp.up)),
                                     (o, nn.Identity(), (attn.o,)), (head, nn.Identity(), (model.decoder.lm_head,))):
            expected = torch.cat([layer(norm(x)) for layer in layers], -1)
            torch.testing.assert_close(packed_linear(x, packed), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(packed_linear(x[None], packed), expected[None], rtol=1e-5, atol=1e-5)
            residual = torch.randn_like(expected)
            torch.testing.assert_close(packed_linear(x, packed, residual), expected + residual, rtol=1e-5, atol=1e-5)


def test_norms_are_folded_only_where_nothing_would_see_the_unnormed_input():
    model = tiny_model()
    blocks = model.decoder.layers
    blocks[0].attn_norm.register_forward_hook(lambda *a: None)  # an observed norm runs as itself
    blocks[1].mlp.register_forward_pre_hook(lambda *a: None)  # so does the input of an observed child
    packs = PackedLinears(model)
    assert packs.folded_blocks == list(blocks[2:])
    ids = prompt(model)
    with torch.inference_mode():
        expected = model(ids).logits
        with packs:
            assert [b.packed for b in blocks] == [None, None] + [True] * (len(blocks) - 2)
            assert blocks[0].attn.packed[0].rms_eps is None and blocks[0].mlp.packed[0].rms_eps is None
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert all(b.packed is None for b in blocks)


def test_packed_linear_adds_the_bias_for_any_number_of_leading_dims():
    layer = nn.Linear(5, 4)
    packed = PackedWeight(layer.weight.detach().t().contiguous(), layer.bias.detach())
    with torch.inference_mode():
        for shape in ((4, 5), (2, 3, 5), (5,)):
            x = torch.randn(shape)
            torch.testing.assert_close(packed_linear(x, packed), layer(x), rtol=1e-6, atol=1e-6)


def test_a_model_keeps_its_packed_weights_between_generations():
    model = tiny_model()
    packs = PackedLinears.for_model(model)
    assert PackedLinears.for_model(model) is packs  # nothing changed: no copy
    with torch.no_grad():
        model.decoder.layers[0].attn.q.weight.mul_(2)  # in place: re-copied when entered
    ids = prompt(model)
    with torch.inference_mode():
        expected = model(ids).logits
        with packs:  # the copies taken before the change
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    packs = PackedLinears.for_model(model)
    assert PackedLinears.for_model(model) is packs
    model.decoder.layers[1].mlp.down.register_forward_hook(lambda *a: None)  # observed now: rebuilt
    rebuilt = PackedLinears.for_model(model)
    assert rebuilt is not packs
    assert model.decoder.layers[1].mlp not in rebuilt.packed_modules
    model.decoder.layers[0].attn.o.weight = nn.Parameter(torch.zeros_like(model.decoder.layers[0].attn.o.weight))
    assert PackedLinears.for_model(model) is not rebuilt  # a replaced tensor: rebuilt
    PackedLinears.forget(model)
    assert PackedLinears.for_model(model) is not rebuilt


def test_packed_weights_go_with_their_model():
    import gc
    import weakref

    model = tiny_model()
    PackedLinears.for_model(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the kept copies do not hold the model


def test_writes_through_data_are_not_left_stale_between_generations():
    """``p.data`` writes bump no version counter (an EMA written that way, a manual reload): the
    kept copies are checked against the weights' storage and a sample of their values."""
    model = tiny_model(seed=3)
    ids = prompt(model, rows=2, length=7, seed=3)
    config = GenerationConfig(max_new_tokens=10)
    generate(model, ids, config=config)
    kept = PackedLinears.for_model(model)
    for p in model.decoder.parameters():
        p.data.mul_(1.7)  # in place, no version bump
    assert PackedLinears.for_model(model) is not kept
    fresh = tiny_model(seed=3)
    with torch.no_grad():
        for p in fresh.decoder.parameters():
            p.mul_(1.7)
    assert generate(model, ids, config=config).tokens == generate(fresh, ids, config=config).tokens
    kept = PackedLinears.for_model(model)
    layer = model.decoder.layers[2].mlp.down
    layer.weight.data = layer.weight.detach().clone() * 0  # a new storage
    assert PackedLinears.for_model(model) is not kept
