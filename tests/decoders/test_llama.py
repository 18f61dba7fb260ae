"""Llama decoder: GQA, packed documents equal separate rows, cache overflow, RMSNorm."""
import pytest
import torch

from minivlm.config import DecoderConfig
from minivlm.decoders.llama import LlamaDecoder
from minivlm.kernels.mask import AttentionMask
from minivlm.layers.norms import RMSNorm


def decoder(**kw):
    cfg = DecoderConfig(vocab_size=100, width=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48, **kw)
    return LlamaDecoder(cfg).eval()


def run(dec, ids, mask=None, pos=None):
    pos = pos if pos is not None else torch.arange(ids.shape[1]).expand_as(ids)
    return dec.logits(dec(dec.embed(ids), mask or AttentionMask.causal_lm(), pos))


def test_packed_documents_equal_separate_rows():
    dec = decoder()
    a, b = torch.randint(0, 100, (1, 7)), torch.randint(0, 100, (1, 5))
    packed = torch.cat([a, b], 1)
    docs = torch.tensor([[0] * 7 + [1] * 5])
    pos = torch.tensor([list(range(7)) + list(range(5))])
    with torch.no_grad():
        out = run(dec, packed, AttentionMask(causal=True, document_ids=docs), pos)
        torch.testing.assert_close(out[:, :7], run(dec, a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 7:], run(dec, b), atol=1e-5, rtol=1e-5)


def test_tied_and_untied_heads():
    tied = decoder()
    assert tied.lm_head.weight is tied.embed.weight
    untied = decoder(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight


def test_cache_overflow_is_a_clear_error():
    dec = decoder()
    cache = dec.new_cache(batch=1, max_len=4)
    ids = torch.randint(0, 100, (1, 5))
    with pytest.raises(ValueError, match="KV cache overflow"):
        dec(dec.embed(ids), AttentionMask.causal_lm(), torch.arange(5)[None], cache)


def test_rmsnorm_by_hand():
    norm = RMSNorm(2, eps=0.0)
    x = torch.tensor([[3.0, 4.0]])  # rms = sqrt((9 + 16) / 2)
    torch.testing.assert_close(norm(x), x / (12.5 ** 0.5))
