"""The Triton FlashAttention-2 backend agrees with the math reference on the whole VLM mask family.

Outputs and gradients (dq, dk, dv) are compared with ``math_attention`` on masks drawn at random:
causal, bidirectional, prefix-LM image spans, packed documents with spans inside, left/right key
padding, decode-style ``q_offset`` with T < S, grouped-query heads, lengths that are not multiples
of the block size. Block skipping is checked on its own: packed documents visit the block
diagonal, not the causal triangle.

Without CUDA the kernels run in Triton's interpreter on CPU tensors. Triton decides "interpreted"
per jit function when it is decorated, its own ``tl.sum``/``tl.max`` when triton is first imported,
so ``TRITON_INTERPRET=1`` must be in the environment before that. This module sets it when triton
is not imported yet (running this file alone); in a full session timm/open_clip/torch._dynamo
may have imported triton already, and then :func:`test_in_a_fresh_interpreter_process` runs this
file in a subprocess instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

triton_attention_module = pytest.importorskip("minivlm.kernels.triton_attention")

from minivlm.kernels.dispatch import BACKENDS, attention  # noqa: E402
from minivlm.kernels.mask import AttentionMask  # noqa: E402
from minivlm.kernels.reference import math_attention  # noqa: E402

RUNS_IN_THIS_PROCESS = torch.cuda.is_available() or triton_attention_module.INTERPRETER_READY


@pytest.fixture(autouse=True)
def _kernels_runnable_here(request):
    if not RUNS_IN_THIS_PROCESS and request.node.originalname != "test_in_a_fresh_interpreter_process":
        pytest.skip("triton was imported before TRITON_INTERPRET=1: test_in_a_fresh_interpreter_process runs this")


@pytest.mark.skipif(RUNS_IN_THIS_PROCESS, reason="the kernels run in this process")
def test_in_a_fresh_interpreter_process():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not fresh_interpreter_process", __file__],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


BlockSchedule = triton_attention_module.BlockSchedule
block_tiles = triton_attention_module.block_tiles
block_visit_mask = triton_attention_module.block_visit_mask
triton_attention = triton_attention_module.triton_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: In bf16/fp16 the error against the fp32 reference (Frobenius norm) may be this many unit
#: roundoffs of the magnitude of the summed terms (see _term_magnitudes). The kernel rounds O, P
#: and dS to the input dtype, as FlashAttention does; 150 random scenarios measured at most 1.1
#: (bf16 dv), a wrong tile or mask costs ~1/u = 256 (bf16).
LOW_PRECISION_ROUNDOFFS = 4
#: Outputs are convex combinations of V rows (no cancellation), so a plain relative bound works
#: for them: 8 bf16 unit roundoffs (measured at most 1.5 on random scenarios).
BF16_OUTPUT_REL_TOL = 8 * 2**-8


# -------------------------------------------------------------------------------------------
# Mask scenarios
# -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """One attention call: shapes plus a mask of the VLM family, built from plain tuples.

    ``documents[b]`` are document lengths summing to S; ``spans[b]`` are (start, length) image
    spans; ``padding[b]`` is (left, right) padding of the keys.
    """

    batch: int
    q_heads: int
    kv_heads: int
    T: int
    S: int
    head_dim: int
    causal: bool = True
    q_offset: int = 0
    documents: tuple[tuple[int, ...], ...] | None = None
    spans: tuple[tuple[tuple[int, int], ...], ...] | None = None
    padding: tuple[tuple[int, int], ...] | None = None
    seed: int = 0

    def mask(self) -> AttentionMask:
        kwargs = {}
        if self.documents is not None:
            kwargs["document_ids"] = torch.tensor(
                [[doc for doc, length in enumerate(lengths) for _ in range(length)] for lengths in self.documents]
            )
        if self.spans is not None:
            span_ids = torch.zeros(self.batch, self.S, dtype=torch.long)
            for row, row_spans in enumerate(self.spans):
                for span_id, (start, length) in enumerate(row_spans, start=1):
                    span_ids[row, start : start + length] = span_id
            kwargs["span_ids"] = span_ids
        if self.padding is not None:
            positions = torch.arange(self.S)
            kwargs["key_valid"] = torch.stack(
                [(positions >= left) & (positions < self.S - right) for left, right in self.padding]
            )
        kwargs = {name: values.to(DEVICE) for name, values in kwargs.items()}
        return AttentionMask(causal=self.causal, q_offset=self.q_offset, **kwargs)

    def tensors(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """q, k, v, and an upstream gradient, random but fixed by ``seed``."""
        g = torch.Generator().manual_seed(self.seed)
        q_shape = (self.batch, self.q_heads, self.T, self.head_dim)
        kv_shape = (self.batch, self.kv_heads, self.S, self.head_dim)
        shapes = (q_shape, kv_shape, kv_shape, q_shape)
        return tuple(torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype) for shape in shapes)


@st.composite
def scenarios(draw, max_len: int = 48) -> Scenario:
    batch = draw(st.integers(1, 2))
    kv_heads, group = draw(st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)]))
    S = draw(st.integers(1, max_len))
    T = draw(st.one_of(st.just(S), st.integers(1, S)))  # prefill / training, or decode-style
    q_offset = draw(st.integers(0, S - T))
    causal = draw(st.sampled_from([True, True, False]))
    documents = spans = padding = None
    if draw(st.booleans()) and S >= 2:
        documents = tuple(_split(draw, S, draw(st.integers(2, min(4, S)))) for _ in range(batch))
    if causal and draw(st.booleans()):
        spans = tuple(_draw_spans(draw, documents[row] if documents else (S,)) for row in range(batch))
    if draw(st.booleans()):
        padding = tuple(_draw_padding(draw, S) for _ in range(batch))
    return Scenario(
        batch=batch, q_heads=kv_heads * group, kv_heads=kv_heads, T=T, S=S,
        head_dim=draw(st.sampled_from([16, 32])), causal=causal, q_offset=q_offset,
        documents=documents, spans=spans, padding=padding, seed=draw(st.integers(0, 2**16)),
    )


def _split(draw, total: int, parts: int) -> tuple[int, ...]:
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), min_size=parts - 1, max_size=parts - 1)))
    bounds = [0, *cuts, total]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def _draw_spans(draw, document_lengths: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """1-3 non-overlapping image spans, each inside one document."""
    spans, doc_start = [], 0
    for index, length in enumerate(document_lengths):
        last_chance = not spans and index == len(document_lengths) - 1
        if last_chance or len(spans) < 3 and draw(st.booleans()):
            span_length = draw(st.integers(1, length))
            spans.append((doc_start + draw(st.integers(0, length - span_length)), span_length))
        doc_start += length
    return tuple(spans)


def _draw_padding(draw, S: int) -> tuple[int, int]:
    pad = draw(st.integers(0, S))  # S: a row that is all padding
    return (pad, 0) if draw(st.booleans()) else (0, pad)


# -------------------------------------------------------------------------------------------
# Comparison helpers
# -------------------------------------------------------------------------------------------
def _forward_backward(fn, scenario: Scenario, q, k, v, grad_out):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, scenario.mask())
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def _reference(scenario: Scenario, dtype: torch.dtype):
    """math_attention in fp32 on the (possibly low-precision) inputs."""
    q, k, v, grad_out = (t.float() for t in scenario.tensors(dtype))
    return _forward_backward(math_attention, scenario, q, k, v, grad_out)


def _term_magnitudes(scenario: Scenario, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Norms of the sums of |terms| behind out, dq, dk, dv (fp32, from the rounded inputs).

    A rounded sum is off by about the unit roundoff times the sum of its terms' magnitudes, not
    times its value: dS = P * (dP - delta) cancels, and a small dQ carries the rounding of its
    large terms in any implementation. These magnitudes give the low-precision error scale.
    """
    q, k, v, grad_out = (t.float() for t in scenario.tensors(dtype))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5
    allowed = scenario.mask().dense(q.shape[2], k.shape[2], q.device)
    probs = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf")), -1).nan_to_num()
    out_terms = probs @ v.abs()
    delta_terms = (grad_out.abs() * out_terms).sum(-1, keepdim=True)
    dscores_terms = probs * (grad_out.abs() @ v.abs().transpose(-1, -2) + delta_terms)
    dq = scale * dscores_terms @ k.abs()
    per_kv_head = lambda t: t.unflatten(1, (-1, group)).sum(2)  # noqa: E731 - GQA: sum over the group
    dk = per_kv_head(scale * dscores_terms.transpose(-1, -2) @ q.abs())
    dv = per_kv_head(probs.transpose(-1, -2) @ grad_out.abs())
    return tuple(t.norm() for t in (out_terms, dq, dk, dv))


def _assert_matches_math(scenario: Scenario, dtype: torch.dtype) -> None:
    got = _forward_backward(triton_attention, scenario, *scenario.tensors(dtype))
    expected = _reference(scenario, dtype)
    if dtype == torch.float32:
        for name, actual, reference in zip(("out", "dq", "dk", "dv"), got, expected):
            torch.testing.assert_close(actual, reference, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        return
    unit_roundoff = torch.finfo(dtype).eps / 2
    for name, actual, reference, magnitude in zip(("out", "dq", "dk", "dv"), got, expected, _term_magnitudes(scenario, dtype)):
        assert actual.dtype == dtype, name
        error = (actual.float() - reference).norm()
        bound = LOW_PRECISION_ROUNDOFFS * unit_roundoff * magnitude + 1e-6
        assert error <= bound, f"{name}: error {error:.2e} > {bound:.2e} in {dtype}"


# -------------------------------------------------------------------------------------------
# Agreement with the math reference
# -------------------------------------------------------------------------------------------
NAMED_SCENARIOS = {
    "causal_gqa_4_to_2": Scenario(batch=2, q_heads=4, kv_heads=2, T=37, S=37, head_dim=16),
    "bidirectional_gqa_4_to_1": Scenario(batch=1, q_heads=4, kv_heads=1, T=33, S=33, head_dim=32, causal=False),
    "prefix_lm_three_spans": Scenario(
        batch=2, q_heads=2, kv_heads=1, T=45, S=45, head_dim=16,
        spans=(((0, 12), (20, 5), (30, 9)), ((3, 17),)),
    ),
    "image_span_with_full_tiles_above_the_diagonal": Scenario(
        batch=1, q_heads=2, kv_heads=1, T=64, S=64, head_dim=16, spans=(((4, 44),),),
    ),
    "packed_documents_with_spans": Scenario(
        batch=2, q_heads=2, kv_heads=2, T=50, S=50, head_dim=16,
        documents=((10, 20, 20), (5, 15, 25, 5)), spans=(((12, 6),), ((0, 3), (22, 10))),
    ),
    "left_padding_empty_causal_rows": Scenario(
        batch=2, q_heads=2, kv_heads=1, T=40, S=40, head_dim=16, padding=((9, 0), (0, 0)),
    ),
    "right_padding_documents": Scenario(
        batch=2, q_heads=2, kv_heads=2, T=40, S=40, head_dim=16, documents=((30, 10), (15, 25)), padding=((0, 7), (0, 20)),
    ),
    "decode_against_cache": Scenario(
        batch=2, q_heads=4, kv_heads=1, T=3, S=41, head_dim=16, q_offset=38,
        documents=((20, 21), (40, 1)), spans=(((25, 14),), ((2, 30),)), padding=((4, 0), (0, 0)),
    ),
    "head_dim_not_power_of_two": Scenario(batch=1, q_heads=2, kv_heads=2, T=20, S=20, head_dim=24),
    "bidirectional_all_padding_row": Scenario(
        batch=2, q_heads=2, kv_heads=1, T=18, S=18, head_dim=16, causal=False, padding=((18, 0), (3, 0)),
    ),
}


@pytest.mark.parametrize("name", sorted(NAMED_SCENARIOS))
def test_named_scenarios_match_math_fp32(name):
    _assert_matches_math(NAMED_SCENARIOS[name], torch.float32)


@settings(max_examples=30, deadline=None)
@given(scenario=scenarios())
def test_random_masks_match_math_fp32(scenario):
    _assert_matches_math(scenario, torch.float32)


@settings(max_examples=12, deadline=None)
@given(scenario=scenarios(), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_random_masks_match_math_low_precision(scenario, dtype):
    _assert_matches_math(scenario, dtype)


def test_registered_and_reached_through_the_entry_point():
    scenario = NAMED_SCENARIOS["causal_gqa_4_to_2"]
    q, k, v, _ = scenario.tensors(torch.float32)
    assert BACKENDS["triton"] is triton_attention
    out = attention(q, k, v, scenario.mask(), backend="triton", scale=0.3)
    torch.testing.assert_close(out, math_attention(q, k, v, scenario.mask(), scale=0.3), atol=1e-4, rtol=1e-4)


def test_autocast_runs_in_the_autocast_dtype():
    scenario = NAMED_SCENARIOS["packed_documents_with_spans"]
    q, k, v, _ = scenario.tensors(torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = triton_attention(q, k, v, scenario.mask())
    assert out.dtype == torch.bfloat16
    reference = math_attention(q, k, v, scenario.mask())
    assert (out.float() - reference).norm() <= BF16_OUTPUT_REL_TOL * reference.norm()


def test_prepared_mask_is_built_once_per_mask_object():
    scenario = NAMED_SCENARIOS["packed_documents_with_spans"]
    q, k, v, _ = scenario.tensors(torch.float32)
    mask = scenario.mask()
    builds = triton_attention_module._PREPARED.builds
    for _layer in range(3):
        triton_attention(q, k, v, mask)
    assert triton_attention_module._PREPARED.builds == builds + 1


# -------------------------------------------------------------------------------------------
# Block skipping
# -------------------------------------------------------------------------------------------
def test_packed_documents_visit_the_block_diagonal_not_the_causal_triangle():
    block, doc_len, n_docs = 16, 64, 4
    S = doc_len * n_docs
    mask = AttentionMask.causal_lm(document_ids=torch.arange(n_docs).repeat_interleave(doc_len)[None])
    visited = int(block_visit_mask(mask, S, S, block, block).sum())

    blocks_per_doc = doc_len // block
    block_diagonal = n_docs * blocks_per_doc * (blocks_per_doc + 1) // 2  # 40
    causal_triangle = (S // block) * (S // block + 1) // 2  # 136
    assert visited == block_diagonal < causal_triangle / 3
    assert int(block_visit_mask(AttentionMask.causal_lm(), S, S, block, block).sum()) == causal_triangle


def test_unaligned_documents_visit_at_most_the_straddling_blocks_more():
    lengths = (50, 70, 30, 106)  # boundaries fall inside blocks of 16
    mask = AttentionMask.causal_lm(document_ids=torch.arange(4).repeat_interleave(torch.tensor(lengths))[None])
    S, block = sum(lengths), 16
    live = block_visit_mask(mask, S, S, block, block)[0]
    n_blocks = S // block
    dense_tiles = mask.dense(S, S)[0, 0].view(n_blocks, block, n_blocks, block).any(-1).any(-2)
    assert torch.equal(live, dense_tiles)  # exact at block granularity for contiguous documents


def test_prefix_lm_span_reaches_past_the_diagonal_and_padding_blocks_are_skipped():
    span_ids = torch.zeros(1, 64, dtype=torch.long)
    span_ids[0, 8:40] = 1  # an image of 32 tokens seen bidirectionally
    key_valid = torch.ones(1, 64, dtype=torch.bool)
    key_valid[0, 48:] = False  # right padding: the last key block holds no valid key
    live = block_visit_mask(AttentionMask.causal_lm(span_ids=span_ids, key_valid=key_valid), 64, 64, 16, 16)[0]
    assert live[0, 2]  # query block 0 (image tokens 8..15) sees key block 2 (image tokens 32..39)
    assert not live[0, 3].item() and not live[:, 3].any()
    assert live.sum() == 3 + 3 + 3 + 3  # query blocks 0-2 reach block 2 through the span; 3 sees 0-2


def test_decode_step_visits_only_key_blocks_up_to_its_position():
    live = block_visit_mask(AttentionMask.causal_lm(q_offset=40), 1, 41, 16, 16)
    assert live.tolist() == [[[True, True, True]]]
    live = block_visit_mask(AttentionMask.causal_lm(q_offset=20), 1, 64, 16, 16)
    assert live.tolist() == [[[True, True, False, False]]]


@settings(max_examples=40, deadline=None)
@given(scenario=scenarios(max_len=80), block_m=st.sampled_from([16, 32]), block_n=st.sampled_from([16, 32]))
def test_live_tiles_hold_every_allowed_pair_and_full_tiles_only_allowed_pairs(scenario, block_m, block_n):
    mask = scenario.mask()
    T, S = scenario.T, scenario.S
    allowed = mask.dense(T, S).expand(scenario.batch, 1, T, S)[:, 0]
    if mask.key_valid is not None:
        # Drop the diagonal fallback of empty causal rows (the only allowed pairs with an invalid
        # key); the kernels serve it outside the tiles.
        allowed = allowed & mask.key_valid[:, None, :]
    live, full = (t.expand(scenario.batch, -1, -1) for t in block_tiles(mask, T, S, block_m, block_n))
    padded = torch.nn.functional.pad(allowed, (0, -S % block_n, 0, -T % block_m))
    tiles = padded.view(scenario.batch, live.shape[1], block_m, live.shape[2], block_n).transpose(2, 3)
    assert not (tiles.any(-1).any(-1) & ~live).any()
    assert not (full & ~tiles.all(-1).all(-1)).any()


def test_schedule_lists_partial_then_full_blocks():
    live = torch.tensor([[[True, True, False, True], [False, False, False, False]]])
    full = torch.tensor([[[False, True, False, False], [False, False, False, False]]])
    schedule = BlockSchedule.from_tiles(live, full)
    assert schedule.kv_partial.tolist() == [[2, 0]] and schedule.kv_full.tolist() == [[1, 0]]
    assert schedule.kv_index[0, 0, :3].tolist() == [0, 3, 1]  # partial 0, 3; then full 1
    assert schedule.q_partial.tolist() == [[1, 0, 0, 1]] and schedule.q_full.tolist() == [[0, 1, 0, 0]]
    assert schedule.q_index[0, 1, :1].tolist() == [0]


def test_causal_tiles_below_the_diagonal_are_full():
    live, full = block_tiles(AttentionMask.causal_lm(), 64, 64, 16, 16)
    assert torch.equal(full[0], torch.ones(4, 4, dtype=torch.bool).tril(-1))
    assert torch.equal(live[0] & ~full[0], torch.eye(4, dtype=torch.bool))  # only the diagonal is masked


# -------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------
def _qkv(head_dim=16, dtypes=(torch.float32,) * 3, T=8, S=8):
    return tuple(
        torch.randn(1, 2, n, head_dim, device=DEVICE).to(dtype) for n, dtype in zip((T, S, S), dtypes)
    )


@pytest.mark.parametrize("head_dim", [8, 256])
def test_unsupported_head_dim_is_rejected(head_dim):
    with pytest.raises(ValueError, match=r"head dims 16\.\.128; got " + str(head_dim)):
        triton_attention(*_qkv(head_dim=head_dim), AttentionMask.causal_lm())


def test_mixed_dtypes_are_rejected():
    with pytest.raises(ValueError, match="share one dtype"):
        triton_attention(*_qkv(dtypes=(torch.float32, torch.bfloat16, torch.float32)), AttentionMask.causal_lm())


def test_float64_is_rejected():
    with pytest.raises(ValueError, match="supports"):
        triton_attention(*_qkv(dtypes=(torch.float64,) * 3), AttentionMask.causal_lm())


def test_cross_attention_masks_are_rejected():
    mask = AttentionMask.cross(torch.ones(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="cross-attention"):
        triton_attention(*_qkv(), mask)


def test_mask_tensors_of_the_wrong_length_are_rejected():
    with pytest.raises(ValueError, match=r"mask.key_valid must be \[B or 1, S\]"):
        triton_attention(*_qkv(), AttentionMask.causal_lm(key_valid=torch.ones(1, 5, dtype=torch.bool, device=DEVICE)))


def test_document_ids_must_cover_the_query_positions():
    mask = AttentionMask.causal_lm(document_ids=torch.zeros(1, 8, dtype=torch.long, device=DEVICE), q_offset=4)
    with pytest.raises(ValueError, match="beyond its length S=8"):
        triton_attention(*_qkv(), mask)


def test_empty_sequences_are_rejected():
    with pytest.raises(ValueError, match="needs B, T, S >= 1; got B=1, T=0, S=8"):
        triton_attention(*_qkv(T=0), AttentionMask.causal_lm())


def test_grouped_heads_must_divide():
    q = torch.randn(1, 3, 8, 16, device=DEVICE)
    k = v = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        triton_attention(q, k, v, AttentionMask.causal_lm())
