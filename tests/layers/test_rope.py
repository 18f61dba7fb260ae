"""Rotary tables: looked up from a table when the caller bounds the positions (a KV cache's
length), computed otherwise; both give the same values, in the caller's dtype."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.layers.rope import RotaryEmbedding, apply_rope, rope_tables, rotate, rotate_half


@settings(max_examples=25, deadline=None)
@given(head_dim=st.sampled_from([4, 6, 32, 64]), rows=st.integers(1, 3), length=st.integers(1, 12),
       limit=st.integers(1, 300), theta=st.sampled_from([10000.0, 100000.0]))
def test_looked_up_tables_equal_computed_ones(head_dim, rows, length, limit, theta):
    rope = RotaryEmbedding(head_dim, theta)
    positions = torch.randint(0, limit, (rows, length))
    cos, sin = rope.tables(positions, torch.float32, limit)
    ref_cos, ref_sin = rope_tables(*rope(positions), torch.float32)
    assert cos.shape == (rows, 1, length, head_dim)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)


def test_the_table_grows_with_the_limit_and_follows_the_frequencies():
    rope = RotaryEmbedding(8)
    rope.tables(torch.arange(4)[None], torch.float32, 16)
    assert rope._table[1].shape == (16, 2, 8)
    rope.tables(torch.tensor([[40]]), torch.float32, 64)  # a longer cache: the table grows
    assert rope._table[1].shape == (64, 2, 8)
    rope.to(torch.float64)  # new frequencies (another dtype, another tensor): the table is rebuilt
    cos, _ = rope.tables(torch.tensor([[40]]), torch.float64, 64)
    assert cos.dtype == torch.float64
    torch.testing.assert_close(cos, rope_tables(*rope(torch.tensor([[40]])), torch.float64)[0])


def test_tables_come_in_the_callers_dtype_and_are_plain_tensors_from_inference_mode():
    rope = RotaryEmbedding(16)
    with torch.inference_mode():
        cos, sin = rope.tables(torch.arange(5)[None], torch.bfloat16, 8)
    assert cos.dtype == sin.dtype == torch.bfloat16
    assert not rope._table[1].is_inference()  # forwards outside inference mode read it too
    ref_cos, ref_sin = rope_tables(*rope(torch.arange(5)[None]), torch.bfloat16)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


def test_rotate_matches_the_rotate_half_formula():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 5, 8)
    cos, sin = rope(torch.arange(5).expand(2, 5))
    expected = x * cos[:, None] + rotate_half(x) * sin[:, None]
    torch.testing.assert_close(apply_rope(x, cos, sin), expected)
    torch.testing.assert_close(rotate(x, rope.tables(torch.arange(5).expand(2, 5), x.dtype, 5)), expected)
