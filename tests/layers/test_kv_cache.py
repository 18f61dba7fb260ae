"""The static KV cache: eager forwards read only the columns written so far (and no key mask while
nothing is padded); a compiled step switches the cache to whole-buffer reads for good; both decode
the same tokens as a full recompute."""
import pytest
import torch

from minivlm import VisionLanguageModel, preset
from minivlm.generate.decoding import decode_step, prefill
from minivlm.kernels.dispatch import override_backend
from minivlm.kernels.reference import sdpa_attention
from minivlm.layers.kv_cache import StaticKVCache


def model_and_prompt(rows: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    model = VisionLanguageModel(preset("tiny")).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.image_token_id + 1, model.config.decoder.vocab_size, (rows, 9), generator=g)
    return model, ids


def record_attention_calls():
    """An attention backend that records (key columns, key mask) of every self-attention call."""
    calls = []

    def backend(q, k, v, mask, scale=None):
        calls.append((k.shape[2], mask.key_valid, mask.q_offset))
        return sdpa_attention(q, k, v, mask, scale=scale)

    return calls, backend


def greedy_full_recompute(model, ids, n):
    out = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(out).logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
    return out[:, ids.shape[1]:]


def test_eager_decode_reads_the_written_columns_without_a_key_mask():
    model, ids = model_and_prompt()
    cache = model.decoder.new_cache(1, 32)
    calls, backend = record_attention_calls()
    with torch.no_grad(), override_backend(backend):
        logits = prefill(model, cache, ids, None, None)
        assert cache.read_len == 9 and cache.pos == 9
        tokens = [logits.argmax(-1)]
        for _ in range(3):
            tokens.append(decode_step(model, cache, tokens[-1]).argmax(-1))
    n_layers = model.config.decoder.n_layers
    # prefill: 9 keys (causal flag, no mask); then 10, 11, 12 keys, each query at the newest column
    assert [c[0] for c in calls] == [9] * n_layers + [10] * n_layers + [11] * n_layers + [12] * n_layers
    assert all(key_valid is None for _, key_valid, _ in calls)
    assert [c[2] for c in calls[n_layers::n_layers]] == [9, 10, 11]
    assert torch.stack(tokens, 1).tolist() == greedy_full_recompute(model, ids, 4).tolist()


def test_left_padding_keeps_a_key_mask_over_the_read_columns():
    model, ids = model_and_prompt(rows=2)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0  # row 1 is left-padded by 3
    cache = model.decoder.new_cache(2, 32)
    calls, backend = record_attention_calls()
    with torch.no_grad(), override_backend(backend):
        tokens = [prefill(model, cache, ids, attention_mask, None).argmax(-1)]
        tokens.append(decode_step(model, cache, tokens[-1]).argmax(-1))
    k_columns, key_valid, _ = calls[-1]
    assert k_columns == 10 and key_valid.shape == (2, 10)
    assert key_valid[1].tolist() == [False] * 3 + [True] * 7 and bool(key_valid[0].all())
    # the padded row decodes as its unpadded prompt alone
    alone = greedy_full_recompute(model, ids[1:, 3:], 2)
    assert torch.stack(tokens, 1)[1].tolist() == alone[0].tolist()


def test_a_compiled_step_switches_the_cache_to_whole_buffer_reads():
    model, ids = model_and_prompt()
    cache = model.decoder.new_cache(1, 32)
    torch._dynamo.reset()
    step = torch.compile(decode_step, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        tokens = [prefill(model, cache, ids, None, None).argmax(-1)]
        assert not cache.reads_whole_buffer
        tokens.append(step(model, cache, tokens[-1]).argmax(-1))
        assert cache.reads_whole_buffer and cache.read_len == 32
        assert cache.attention_key_valid() is cache.key_valid
        tokens.append(decode_step(model, cache, tokens[-1]).argmax(-1))  # eager again: still whole buffer
        assert cache.read_len == 32 and cache.pos == 11
    assert torch.stack(tokens, 1).tolist() == greedy_full_recompute(model, ids, 3).tolist()


@pytest.mark.parametrize("T", [1, 3])
def test_writing_past_the_end_is_a_clear_error(T):
    cache = StaticKVCache(n_layers=1, batch=1, n_kv_heads=1, max_len=4, head_dim=2)
    cache.reserve(4)
    cache.advance(4)  # full
    with pytest.raises(ValueError, match=f"KV cache overflow: writing positions up to {4 + T} into a cache of length 4"):
        cache.reserve(T)
    assert cache.pos == 4 and int(cache.tokens_seen) == 4  # the failed claim wrote nothing
