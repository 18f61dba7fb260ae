"""Attention maps: recording probabilities without model changes, rollout, token -> patch mapping,
and a hand-set model whose decoder provably attends to the bright patch, which the map must find."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from minivlm.cli import main
from minivlm.config import DecoderConfig, EncoderConfig, FusionConfig, ProjectorConfig, VLMConfig
from minivlm.explain import (
    ExplainError,
    attention_rollout,
    explain,
    record_attention,
    tokens_to_patches,
)
from minivlm.kernels.dispatch import BACKENDS, attention
from minivlm.kernels.mask import AttentionMask
from minivlm.kernels.reference import math_attention
from minivlm.model import VisionLanguageModel
from minivlm.registry import image_seq_len
from minivlm.text.tokenizer import Tokenizer
from minivlm.train.recipe import attach_tokenizer, build_processor
from minivlm.vision import NORMALIZATIONS

GRID = 4  # 32 px images, 8 px patches
BRIGHT_PATCH = (2, 1)  # (row, column) of the white square in `square_image`


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    corpus = ["what is in the image?", "a white square on black", "user\nassistant\n", "where is the square?"]
    return Tokenizer.train(corpus * 20, vocab_size=320)


def square_image() -> Image.Image:
    """Black 32x32 image with one white 8x8 patch at BRIGHT_PATCH."""
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    r, c = BRIGHT_PATCH
    pixels[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 255
    return Image.fromarray(pixels)


def small_config(projector: str = "linear", fusion: str = "splice", **encoder) -> VLMConfig:
    return VLMConfig(
        encoder=EncoderConfig(image_size=32, patch_size=8, width=16, depth=2, n_heads=2, mlp_dim=32, **encoder),
        projector=ProjectorConfig(kind=projector, depth=1, shuffle_factor=2, n_latents=4, n_layers=2, n_heads=2),
        fusion=FusionConfig(kind=fusion),
        decoder=DecoderConfig(width=16, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=32, max_seq_len=256),
    )


def random_model(tokenizer: Tokenizer, **kw) -> VisionLanguageModel:
    cfg = attach_tokenizer(small_config(**kw), tokenizer)
    model = VisionLanguageModel(cfg)
    model.processor = build_processor(cfg, tokenizer)
    return model


def bright_seeking_model(tokenizer: Tokenizer, projector: str) -> VisionLanguageModel:
    """A model whose decoder attends (almost) only to image tokens showing a bright patch.

    Encoder: feature 0 of a patch is its mean brightness above black, blocks are identities, so
    after the final LayerNorm a bright patch is a fixed vector ``v`` and a black one is ~0. The
    projector maps ``v`` to decoder dimension 1. Every text embedding is 1 in dimension 0. One
    decoder layer reads dimension 0 into its queries and dimension 1 into its keys (in the
    slowest RoPE frequency, which ``rope_theta=1e12`` freezes), so a text query scores ~20 on a
    bright image token and ~0 on anything else.
    """
    cfg = small_config(projector)
    cfg.encoder.depth, cfg.decoder.n_layers, cfg.decoder.n_kv_heads = 1, 1, 2
    cfg.decoder.rope_theta = 1e12
    cfg = attach_tokenizer(cfg, tokenizer)
    model = VisionLanguageModel(cfg)
    D, head_dim = cfg.encoder.width, cfg.decoder.resolved_head_dim
    mean, std = (torch.tensor(v) for v in NORMALIZATIONS[cfg.encoder.normalization])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        enc = model.encoder
        enc.patch_embed.weight[0] = 1.0 / enc.patch_embed.weight[0].numel()
        enc.patch_embed.bias[0] = (mean / std).mean()  # black (normalised) -> 0
        for module in (enc.norm, enc.blocks[0].norm1, enc.blocks[0].norm2):
            module.weight.fill_(1.0)
        v = enc.norm(torch.eye(D)[0])
        projector_weight = (model.projector.proj if projector == "linear" else model.projector.mlp[0]).weight
        in_dim = projector_weight.shape[1]
        projector_weight[1] = 4.0 * v.repeat(in_dim // D) / (v @ v) / (in_dim // D)
        model.decoder.embed.weight[:, 0] = 1.0
        layer = model.decoder.layers[0]
        layer.attn_norm.weight.fill_(1.0)
        layer.mlp_norm.weight.fill_(1.0)
        model.decoder.norm.weight.fill_(1.0)
        slow = head_dim // 2 - 1  # RoPE pairs dims (i, i + head_dim/2); pair head_dim/2 - 1 turns slowest
        for head in range(cfg.decoder.n_heads):
            layer.attn.q.weight[head * head_dim + slow, 0] = 2.0
            layer.attn.k.weight[head * head_dim + slow, 1] = 2.0
        layer.attn.v.weight.copy_(torch.eye(cfg.decoder.width))
    model.processor = build_processor(cfg, tokenizer)
    return model


# ---- recording -----------------------------------------------------------------------------------


def test_recorded_attention_matches_the_reference_and_names_its_caller(tokenizer):
    model = random_model(tokenizer)
    model.eval()
    ids = torch.full((1, 24), 10)
    ids[0, 2:2 + image_seq_len(model.config)] = model.config.image_token_id
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(ids, pixel_values=pixels).logits
        with record_attention(model) as recorder:
            recorded = model(ids, pixel_values=pixels).logits
    torch.testing.assert_close(recorded, expected, atol=1e-5, rtol=1e-5)
    names = [r.module for r in recorder.records]
    assert names == ["encoder.blocks.0.attn", "encoder.blocks.1.attn", "decoder.layers.0.attn", "decoder.layers.1.attn"]
    for record in recorder.records:
        torch.testing.assert_close(record.probs.sum(-1), torch.ones(record.probs.shape[:-1]))
    assert recorder.records[2].probs.shape == (1, 2, 24, 24)  # grouped-query keys repeated per head
    assert np.triu(recorder.records[2].probs[0, 0].numpy(), k=1).max() == 0  # causal


def test_recording_output_equals_math_attention_with_grouped_query_heads():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = AttentionMask(causal=True, q_offset=2)
    with record_attention(torch.nn.Identity()) as recorder:
        out = attention(q, k, v, mask, backend="sdpa")
    torch.testing.assert_close(out, math_attention(q, k, v, mask))
    assert recorder.records[0].probs.shape == (2, 4, 5, 7)


def test_routing_is_restored_even_when_the_block_raises_and_the_backend_table_is_never_patched():
    before = dict(BACKENDS)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="boom"):
        with record_attention(torch.nn.Linear(2, 2)) as recorder:
            attention(q, k, v, AttentionMask.causal_lm(), backend="sdpa")
            assert len(recorder.records) == 1
            assert BACKENDS == before
            raise RuntimeError("boom")
    attention(q, k, v, AttentionMask.causal_lm(), backend="sdpa")
    assert len(recorder.records) == 1  # calls after the block are not recorded
    assert BACKENDS == before


# ---- rollout ---------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(n_layers=st.integers(1, 4), n_heads=st.integers(1, 3), length=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_rollout_rows_sum_to_one(n_layers, n_heads, length, seed):
    g = torch.Generator().manual_seed(seed)
    layers = [torch.softmax(torch.randn(n_heads, length, length, generator=g) * 3, -1) for _ in range(n_layers)]
    rollout = attention_rollout(layers)
    assert rollout.shape == (length, length)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(length))
    assert rollout.min() >= 0


def test_rollout_of_one_uniform_block_mixes_identity_and_uniform():
    rollout = attention_rollout([torch.full((2, 4, 4), 0.25)])
    torch.testing.assert_close(rollout, 0.5 * torch.eye(4) + 0.125)


def test_rollout_of_self_attention_is_identity():
    torch.testing.assert_close(attention_rollout([torch.eye(5)[None]] * 3), torch.eye(5))


def test_rollout_rejects_missing_and_mismatched_blocks():
    with pytest.raises(ExplainError, match="at least one"):
        attention_rollout([])
    with pytest.raises(ExplainError, match=r"block 1: expected attention of shape \[H, 4, 4\]"):
        attention_rollout([torch.eye(4)[None], torch.eye(5)[None]])


# ---- token -> patch mapping ------------------------------------------------------------------------


def test_one_to_one_projectors_map_token_i_to_patch_i():
    weights = torch.arange(16.0)
    grid = tokens_to_patches(weights, small_config("mlp"))
    assert grid.shape == (GRID, GRID)
    assert grid[2, 1] == 9


def test_pixel_shuffle_spreads_each_token_over_its_patch_block():
    weights = torch.tensor([0.0, 0.0, 1.0, 0.0])  # coarse token (1, 0)
    grid = tokens_to_patches(weights, small_config("pixel_shuffle"))
    expected = torch.zeros(GRID, GRID)
    expected[2:4, 0:2] = 0.25
    torch.testing.assert_close(grid, expected)


def test_resampler_pushes_latent_weight_to_the_patches_it_attended():
    cfg = small_config("resampler")  # 4 latents over 16 patches
    attn = torch.zeros(2, 4, 16 + 4)  # [H, latents, patches + latents]
    attn[:, 0, 5] = 0.5  # latent 0 -> patch 5, and itself
    attn[:, 0, 16] = 0.5
    attn[:, 1:, :16] = 1 / 16
    grid = tokens_to_patches(torch.tensor([1.0, 0.0, 0.0, 0.0]), cfg, [attn])
    assert grid.flatten().argmax() == 5
    torch.testing.assert_close(grid.sum(), torch.tensor(1.0))


def test_token_mapping_errors_name_the_problem():
    with pytest.raises(ExplainError, match="expected 16 image tokens, got 3"):
        tokens_to_patches(torch.ones(3), small_config("linear"))
    with pytest.raises(ExplainError, match="pixel_shuffle"):
        tokens_to_patches(torch.ones(16), small_config("pixel_shuffle"))
    with pytest.raises(ExplainError, match="latents' attention"):
        tokens_to_patches(torch.ones(4), small_config("resampler"))


# ---- end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize("projector", ["linear", "pixel_shuffle"])
def test_decoder_map_is_highest_on_the_patch_the_model_attends(tokenizer, projector):
    model = bright_seeking_model(tokenizer, projector)
    result = explain(model, square_image(), "where is the square?", max_new_tokens=3)
    r, c = BRIGHT_PATCH
    assert result.image_attention_share > 0.99
    if projector == "linear":
        assert np.unravel_index(result.decoder_map.argmax(), result.decoder_map.shape) == BRIGHT_PATCH
        assert result.decoder_map[r, c] > 0.99
    else:  # the bright patch's 2x2 block shares its token's weight
        block = result.decoder_map[r // 2 * 2:r // 2 * 2 + 2, c // 2 * 2:c // 2 * 2 + 2]
        np.testing.assert_allclose(block, 0.25, atol=0.01)
    # An identity encoder block attends, but the rollout keeps half of every patch on itself.
    assert result.flow_map[r, c] >= 0.5 * result.decoder_map[r, c] - 1e-6


@pytest.mark.parametrize("projector, fusion", [("mlp", "splice"), ("pixel_shuffle", "prefix"),
                                               ("resampler", "splice"), ("linear", "cross_attention")])
def test_explain_returns_normalised_maps_for_every_fusion(tokenizer, tmp_path, projector, fusion):
    model = random_model(tokenizer, projector=projector, fusion=fusion)
    if fusion == "cross_attention":
        for block in model.fusion.blocks:
            block.attn_gate.data.fill_(0.5)
    result = explain(model, square_image(), "what is in the image?", answer="a white square")
    assert result.answer == "a white square"
    for grid in (result.decoder_map, result.encoder_map, result.flow_map):
        assert grid.shape == (GRID, GRID)
        assert grid.min() >= 0
        np.testing.assert_allclose(grid.sum(), 1.0, rtol=1e-5)
    assert result.rollout.shape == (16, 16)
    np.testing.assert_allclose(result.rollout.sum(-1), 1.0, rtol=1e-5)
    assert result.image.shape == (32, 32, 3) and 0 <= result.image.min() <= result.image.max() <= 1
    assert (result.image_attention_share is None) == (fusion == "cross_attention")
    path = result.save(tmp_path / "maps.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_class_token_rollout_uses_the_class_row(tokenizer):
    model = random_model(tokenizer, class_token=True)
    result = explain(model, square_image(), "what is in the image?", answer="a square")
    assert result.rollout.shape == (17, 17)
    expected = result.rollout[0, 1:] / result.rollout[0, 1:].sum()
    np.testing.assert_allclose(result.encoder_map.flatten(), expected, rtol=1e-5)


def test_explain_without_a_processor_is_refused(tokenizer):
    model = random_model(tokenizer)
    model.processor = None
    with pytest.raises(ExplainError, match="no processor"):
        explain(model, square_image(), "what is in the image?")


def test_cli_writes_the_png(tokenizer, tmp_path, capsys):
    model_dir = bright_seeking_model(tokenizer, "linear").save_pretrained(tmp_path / "model")
    square_image().save(tmp_path / "square.png")
    out = tmp_path / "maps.png"
    code = main(["explain", "--model", str(model_dir), "--image", str(tmp_path / "square.png"),
                 "--out", str(out), "--max-new-tokens", "2", "where is the square?"])
    assert code == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "Q: where is the square?" in printed and re.search(r"\d+% of the answer's attention", printed)


def test_cli_reports_a_missing_image(tokenizer, tmp_path, capsys):
    model_dir = random_model(tokenizer).save_pretrained(tmp_path / "model")
    code = main(["explain", "--model", str(model_dir), "--image", str(tmp_path / "none.png"), "what?"])
    assert code == 2
    assert "none.png does not exist" in capsys.readouterr().err
