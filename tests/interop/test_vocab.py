"""Vocabulary growth for added special tokens: mean-initialised rows, tied heads stay tied, the
config follows, and the old tokens' predictions are untouched."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm import VisionLanguageModel, preset
from minivlm.config import DecoderConfig
from minivlm.decoders.llama import LlamaDecoder
from minivlm.interop.vocab import resize_token_embeddings


def small_decoder(tie: bool, vocab: int = 50) -> LlamaDecoder:
    return LlamaDecoder(DecoderConfig(vocab_size=vocab, width=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=32,
                                      tie_embeddings=tie))


@settings(max_examples=30, deadline=None)
@given(old=st.integers(1, 64), added=st.integers(0, 40), tie=st.booleans())
def test_new_rows_are_the_mean_and_old_rows_are_kept(old, added, tie):
    decoder = small_decoder(tie, old)
    if not tie:
        torch.nn.init.normal_(decoder.lm_head.weight)
    embed_before, head_before = decoder.embed.weight.detach().clone(), decoder.lm_head.weight.detach().clone()
    resize_token_embeddings(decoder, old + added)
    for weight, before in ((decoder.embed.weight, embed_before), (decoder.lm_head.weight, head_before)):
        assert weight.shape == (old + added, 16)
        assert torch.equal(weight[:old], before)
        torch.testing.assert_close(weight[old:], before.mean(0).expand(added, -1))
    assert (decoder.lm_head.weight is decoder.embed.weight) == tie
    assert decoder.cfg.vocab_size == decoder.embed.num_embeddings == decoder.lm_head.out_features == old + added


def test_vlm_config_follows_and_old_token_logits_are_unchanged(tmp_path):
    model = VisionLanguageModel(preset("tiny").override("decoder.n_layers=1", "encoder.depth=1")).eval()
    ids = torch.randint(4, 1024, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    resize_token_embeddings(model, 1030)
    assert model.config.decoder.vocab_size == 1030
    assert model.decoder.lm_head.weight is model.decoder.embed.weight
    with torch.no_grad():
        after = model(ids).logits
    assert after.shape == (2, 9, 1030)
    torch.testing.assert_close(after[..., :1024], before)
    # The grown model saves and reloads under its updated config.
    model.save_pretrained(tmp_path)
    assert VisionLanguageModel.from_pretrained(tmp_path).decoder.embed.num_embeddings == 1030


def test_frozen_embeddings_stay_frozen_and_equal_size_is_a_no_op():
    decoder = small_decoder(tie=False)
    decoder.requires_grad_(False)
    same = decoder.embed.weight
    assert resize_token_embeddings(decoder, 50).weight is same
    resize_token_embeddings(decoder, 60)
    assert not decoder.embed.weight.requires_grad and not decoder.lm_head.weight.requires_grad


@pytest.mark.parametrize("size", [49, 0, 50.5, True])
def test_shrinking_or_non_integer_sizes_are_refused(size):
    with pytest.raises(ValueError, match="new_vocab_size must be an integer >= the current vocabulary size 50"):
        resize_token_embeddings(small_decoder(tie=True), size)


def test_other_modules_are_refused():
    with pytest.raises(TypeError, match="expected a VisionLanguageModel or LlamaDecoder; got Embedding"):
        resize_token_embeddings(torch.nn.Embedding(4, 2), 8)
