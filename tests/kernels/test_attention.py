"""The attention entry point: mask semantics, SDPA agrees with the math reference, flag-only path."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.kernels.dispatch import attention
from minivlm.kernels.mask import AttentionMask
from minivlm.kernels.reference import math_attention, sdpa_attention


def _qkv(B=2, Hq=4, Hkv=2, T=10, S=10, D=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, Hq, T, D, generator=g, dtype=dtype), torch.randn(B, Hkv, S, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, S, D, generator=g, dtype=dtype))


def test_dense_causal_prefix_and_documents_by_hand():
    # One row of 6 tokens: text, image(2 tokens, span 1), text | new document: text, text
    docs = torch.tensor([[0, 0, 0, 0, 1, 1]])
    spans = torch.tensor([[0, 1, 1, 0, 0, 0]])
    m = AttentionMask(causal=True, document_ids=docs, span_ids=spans).dense(6, 6)[0, 0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # first image token sees the second one (bidirectional span)
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],  # a new document sees nothing before it
        [0, 0, 0, 0, 1, 1],
    ])
    assert torch.equal(m, expected)


def test_padding_rows_stay_finite_and_decode_offsets_align():
    valid = torch.tensor([[False, False, True, True]])  # left padding
    m = AttentionMask(causal=True, key_valid=valid).dense(4, 4)[0, 0]
    assert m[0].tolist() == [True, False, False, False]  # padding query keeps its own key
    assert m[3].tolist() == [False, False, True, True]
    step = AttentionMask(causal=True, q_offset=3, key_valid=valid).dense(1, 4)[0, 0]
    assert step.tolist() == [[False, False, True, True]]


def test_cross_mask_sees_preceding_images_only():
    seen = torch.tensor([[0, 1, 1, 2]])
    keys = torch.tensor([[0, 0, 1, 1, -1]])
    m = AttentionMask.cross(seen, keys).dense(4, 5)[0, 0].int()
    assert m.tolist() == [[0, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
    q, k, v = _qkv(B=1, T=4, S=5)
    out = attention(q, k, v, AttentionMask.cross(seen, keys), backend="sdpa")
    assert torch.all(out[:, :, 0] == 0)  # a query before any image gets nothing
    torch.testing.assert_close(out, math_attention(q, k, v, AttentionMask.cross(seen, keys)), atol=1e-5, rtol=1e-5)


@st.composite
def masks(draw):
    B, T = 2, draw(st.integers(2, 24))
    causal = draw(st.booleans())
    kw = {}
    if draw(st.booleans()):
        lens = [draw(st.integers(1, T)) for _ in range(B)]
        kw["key_valid"] = torch.tensor([[i < n for i in range(T)] for n in lens])
    if causal and draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(1, T - 1), max_size=3)))
        kw["document_ids"] = torch.tensor([[sum(i >= c for c in cuts) for i in range(T)]] * B)
    if causal and draw(st.booleans()):
        start = draw(st.integers(0, T - 2))
        n = draw(st.integers(1, T - start))
        kw["span_ids"] = torch.tensor([[1 if start <= i < start + n else 0 for i in range(T)]] * B)
    return T, AttentionMask(causal=causal, **kw)


@settings(max_examples=40, deadline=None)
@given(masks(), st.sampled_from([(4, 4), (4, 2), (6, 1)]))
def test_sdpa_matches_math_on_the_mask_family(tm, heads):
    T, mask = tm
    q, k, v = _qkv(Hq=heads[0], Hkv=heads[1], T=T, S=T)
    torch.testing.assert_close(sdpa_attention(q, k, v, mask), math_attention(q, k, v, mask), atol=2e-5, rtol=2e-5)


def test_flag_only_path_is_used_for_plain_masks(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append(kw.get("attn_mask"))
        return real(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v = _qkv(T=8, S=8)
    attention(q, k, v, AttentionMask.causal_lm(), backend="sdpa")
    attention(q, k, v, AttentionMask.bidirectional(), backend="sdpa")
    attention(q[:, :, :1], k, v, AttentionMask(causal=True, q_offset=7), backend="sdpa")  # decode step
    assert calls == [None, None, None]
    attention(q, k, v, AttentionMask(causal=True, span_ids=torch.ones(2, 8, dtype=torch.long)), backend="sdpa")
    assert calls[-1] is not None


def test_decode_step_matches_full_causal():
    q, k, v = _qkv(T=9, S=9)
    full = attention(q, k, v, AttentionMask.causal_lm())
    step = attention(q[:, :, -1:], k, v, AttentionMask(causal=True, q_offset=8))
    torch.testing.assert_close(step, full[:, :, -1:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shapes, fragment", [
    (((2, 4, 5, 8), (2, 3, 5, 8), (2, 3, 5, 8)), "multiple of key/value heads"),
    (((2, 4, 5, 8), (2, 2, 5, 8), (2, 2, 6, 8)), "same shape"),
    (((4, 5, 8), (2, 2, 5, 8), (2, 2, 5, 8)), "4-d"),
])
def test_bad_shapes_raise_clear_errors(shapes, fragment):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=fragment):
        attention(q, k, v, AttentionMask.causal_lm())


def test_unknown_backend():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        attention(q, k, v, AttentionMask.causal_lm(), backend="fast")


def test_cpu_training_attends_reduced_precision_in_fp32_under_autocast(monkeypatch):
    # bf16 inputs that need gradients run SDPA in fp32 (faster backward on the CPU), inside
    # autocast too, which would otherwise cast them back down; the result keeps q's dtype.
    dtypes = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *a, **kw):
        dtypes.append(q.dtype)
        return real(q, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    mask = AttentionMask(causal=True, span_ids=torch.ones(2, 12, dtype=torch.long))  # a boolean-mask path
    q, k, v = (t.requires_grad_() for t in _qkv(T=12, S=12, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_attention(q, k, v, mask)
    assert dtypes == [torch.float32] and out.dtype == torch.bfloat16
    expected = real(q.float(), k.float(), v.float(), attn_mask=mask.dense(12, 12, q.device), enable_gqa=True)
    assert torch.equal(out, expected.to(torch.bfloat16))
    out.float().square().sum().backward()
    assert q.grad.dtype == k.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0

    with torch.no_grad():  # inference keeps the input dtype (no backward to save)
        assert sdpa_attention(q, k, v, mask).dtype == torch.bfloat16
    assert dtypes[-1] == torch.bfloat16
