"""The FlexAttention backend: its mask_mod is the AttentionMask rule, its BlockMask is built once per
mask, and the dispatch table sends block-sparse masks to it on CUDA only.

On CPU flex runs forward only (eager); the backward is checked on CUDA.
"""

from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

flex_module = pytest.importorskip("minivlm.kernels.flex_attention")
from minivlm.kernels.dispatch import (  # noqa: E402
    AVAILABLE_BACKENDS,
    BACKENDS,
    MASK_KINDS,
    PerMaskCache,
    attention,
    default_backend,
    pick_backend,
)
from minivlm.kernels.mask import AttentionMask  # noqa: E402
from minivlm.kernels.reference import math_attention  # noqa: E402

BLOCK_MASKS = flex_module.BLOCK_MASKS
block_mask_for = flex_module.block_mask_for
flex_attention_backend = flex_module.flex_attention_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="flex backward runs on CUDA only")


def _qkv(B=2, Hq=4, Hkv=2, T=37, S=37, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D))
    return tuple(torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype) for shape in shapes)


def _family(S: int = 37) -> dict[str, AttentionMask]:
    """One mask per kind of the self-attention family, two rows of S tokens."""
    span_ids = torch.zeros(2, S, dtype=torch.long)
    span_ids[:, 3:10] = 1
    span_ids[1, 20:30] = 2
    document_ids = torch.zeros(2, S, dtype=torch.long)
    document_ids[:, 12:] = 1
    document_ids[:, 25:] = 2
    key_valid = torch.ones(2, S, dtype=torch.bool)
    key_valid[0, :5] = False  # left padding: queries 0..4 of row 0 see no key
    key_valid[1, 30:] = False  # right padding
    branch_ids = torch.zeros(2, S, dtype=torch.long)  # a shared prefix, then three sibling branches
    branch_ids[:, 10:18], branch_ids[:, 18:29], branch_ids[:, 29:] = 1, 2, 3
    span_ids, document_ids, key_valid, branch_ids = (
        t.to(DEVICE) for t in (span_ids, document_ids, key_valid, branch_ids))
    return {
        "causal": AttentionMask.causal_lm(),
        "bidirectional": AttentionMask.bidirectional(),
        "prefix_lm": AttentionMask.causal_lm(span_ids=span_ids),
        "documents_with_spans": AttentionMask.causal_lm(document_ids=document_ids, span_ids=span_ids),
        "padded_causal": AttentionMask.causal_lm(key_valid=key_valid),
        "padded_bidirectional": AttentionMask.bidirectional(key_valid=key_valid),
        "everything": AttentionMask.causal_lm(key_valid=key_valid, document_ids=document_ids, span_ids=span_ids),
        "branches_with_spans": AttentionMask.causal_lm(span_ids=span_ids, branch_ids=branch_ids),
        "branches_in_documents": AttentionMask.causal_lm(document_ids=document_ids, branch_ids=branch_ids,
                                                         key_valid=key_valid),
    }


# -------------------------------------------------------------------------------------------
# Agreement with the math reference
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(_family()))
def test_forward_matches_math_on_the_family(name):
    mask = _family()[name]
    q, k, v = _qkv()
    torch.testing.assert_close(flex_attention_backend(q, k, v, mask), math_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_decode_step_against_a_cache_matches_math():
    mask = _family()["everything"].with_offset(34)
    q, k, v = _qkv(Hkv=1, T=3)
    torch.testing.assert_close(flex_attention_backend(q, k, v, mask), math_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


@st.composite
def arbitrary_masks(draw):
    """Masks from unstructured per-token vectors: ids need not be contiguous or sorted."""
    batch, S = draw(st.integers(1, 2)), draw(st.integers(1, 40))
    T = draw(st.integers(1, S))
    q_offset = draw(st.integers(0, S - T))
    vector = lambda high: torch.tensor(draw(st.lists(st.integers(0, high), min_size=batch * S, max_size=batch * S)))  # noqa: E731
    kwargs = {}
    if draw(st.booleans()):
        kwargs["document_ids"] = vector(3).view(batch, S)
    if draw(st.booleans()):
        kwargs["span_ids"] = vector(2).view(batch, S)
    if draw(st.booleans()):
        kwargs["key_valid"] = vector(1).view(batch, S).bool()
    mask = AttentionMask(causal=draw(st.booleans()), q_offset=q_offset, **{n: t.to(DEVICE) for n, t in kwargs.items()})
    return mask, batch, T, S


@settings(max_examples=20, deadline=None)
@given(case=arbitrary_masks(), gqa=st.sampled_from([(2, 2), (4, 1)]))
def test_forward_matches_math_on_arbitrary_masks(case, gqa):
    mask, batch, T, S = case
    q, k, v = _qkv(B=batch, Hq=gqa[0], Hkv=gqa[1], T=T, S=S)
    torch.testing.assert_close(flex_attention_backend(q, k, v, mask), math_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


@needs_cuda
@pytest.mark.parametrize("name", sorted(_family()))
def test_backward_matches_math_on_cuda(name):
    mask = _family()[name]
    q, k, v = (t.requires_grad_() for t in _qkv())
    grad_out = torch.randn_like(q)
    flex_attention_backend(q, k, v, mask).backward(grad_out)
    got = [t.grad for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    math_attention(q2, k2, v2, mask).backward(grad_out)
    for actual, expected in zip(got, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(actual, expected, atol=2e-3, rtol=2e-3)


# -------------------------------------------------------------------------------------------
# BlockMask cache
# -------------------------------------------------------------------------------------------
def test_block_mask_is_built_once_for_all_layers_of_a_forward():
    mask = _family()["documents_with_spans"]
    q, k, v = _qkv()
    builds = BLOCK_MASKS.builds
    outputs = [attention(q, k, v, mask, backend="flex") for _layer in range(4)]
    assert BLOCK_MASKS.builds == builds + 1
    assert block_mask_for(mask, 2, 37, 37, q.device) is block_mask_for(mask, 2, 37, 37, q.device)
    torch.testing.assert_close(outputs[0], outputs[-1])


def test_a_new_shape_or_offset_builds_a_new_block_mask():
    mask = _family()["padded_causal"]
    first = block_mask_for(mask, 2, 37, 37, torch.device(DEVICE))
    assert block_mask_for(mask, 2, 5, 37, torch.device(DEVICE)) is not first
    assert block_mask_for(mask.with_offset(3), 2, 5, 37, torch.device(DEVICE)) is not first


def test_writing_into_mask_tensors_invalidates_the_cached_block_mask():
    mask = _family()["padded_causal"]
    q, k, v = _qkv()
    flex_attention_backend(q, k, v, mask)
    mask.key_valid[1, :20] = False  # in place: same mask object, new contents
    torch.testing.assert_close(flex_attention_backend(q, k, v, mask), math_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_entries_die_with_their_mask():
    cache = PerMaskCache()
    mask = AttentionMask.causal_lm(key_valid=torch.ones(1, 4, dtype=torch.bool))
    cache.get(mask, "shape", lambda: "derived")
    assert len(cache) == 1
    del mask
    gc.collect()
    assert len(cache) == 0


def test_cache_keeps_at_most_max_entries_most_recent_first():
    cache = PerMaskCache(max_entries=2)
    masks = [AttentionMask.causal_lm() for _ in range(3)]
    for i, mask in enumerate(masks):
        cache.get(mask, None, lambda i=i: i)
    assert len(cache) == 2
    assert cache.get(masks[2], None, lambda: "rebuilt") == 2
    assert cache.get(masks[0], None, lambda: "rebuilt") == "rebuilt"


def test_cache_size_must_be_positive():
    with pytest.raises(ValueError, match="max_entries must be >= 1, got 0"):
        PerMaskCache(max_entries=0)


# -------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------
def test_cross_attention_masks_are_rejected():
    mask = AttentionMask.cross(torch.ones(2, 37, dtype=torch.long), torch.zeros(2, 37, dtype=torch.long))
    with pytest.raises(ValueError, match="cross-attention"):
        flex_attention_backend(*_qkv(), mask)


def test_mask_tensors_of_the_wrong_length_are_rejected():
    mask = AttentionMask.causal_lm(document_ids=torch.zeros(2, 36, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"mask.document_ids must be \[B or 1, S\]"):
        flex_attention_backend(*_qkv(), mask)


# -------------------------------------------------------------------------------------------
# Registration and dispatch
# -------------------------------------------------------------------------------------------
def test_flex_is_listed_in_the_backend_table():
    assert "flex" in AVAILABLE_BACKENDS
    assert BACKENDS["flex"] is flex_attention_backend


@pytest.mark.parametrize(
    "kind, device_type, expected",
    [
        ("causal", "cuda", "sdpa"),
        ("bidirectional", "cuda", "sdpa"),
        ("causal", "cpu", "sdpa"),
        ("prefix_lm", "cuda", "flex"),
        ("documents", "cuda", "flex"),
        ("padded_causal", "cuda", "flex"),
        ("padded_bidirectional", "cuda", "flex"),
        ("prefix_lm", "cpu", "sdpa"),
        ("documents", "cpu", "sdpa"),
        ("padded_causal", "cpu", "sdpa"),
        ("cross", "cuda", "sdpa"),
        ("cross", "cpu", "sdpa"),
    ],
)
def test_default_backend_table(kind, device_type, expected):
    assert default_backend(kind, device_type) == expected


def test_every_mask_kind_has_a_default_backend():
    assert {mask.kind for mask in _family().values()} <= MASK_KINDS
    for kind in MASK_KINDS:
        assert default_backend(kind, "cuda") in BACKENDS


def test_block_sparse_kinds_fall_back_to_sdpa_when_flex_is_missing(monkeypatch):
    monkeypatch.delitem(BACKENDS, "flex")
    assert default_backend("documents", "cuda") == "sdpa"


def test_unknown_mask_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown mask kind 'sliding_window'"):
        default_backend("sliding_window", "cuda")


def test_attention_against_a_kv_cache_stays_on_sdpa():
    key_valid = torch.ones(1, 96, dtype=torch.bool)
    cuda = torch.device("cuda")  # a descriptor: nothing is allocated
    assert pick_backend(AttentionMask.causal_lm(key_valid=key_valid), cuda, 96, 96) == "flex"  # training
    assert pick_backend(AttentionMask.causal_lm(key_valid=key_valid), cuda, 40, 96) == "sdpa"  # prefill into a cache
    assert pick_backend(AttentionMask.causal_lm(q_offset=95, key_valid=key_valid), cuda, 1, 96) == "sdpa"  # decode
