"""The tokenizer.json kind (Hugging Face ``tokenizers``) behind minivlm's tokenizer interface."""
from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.text import load_tokenizer
from minivlm.text.hf_tokenizer import HFTokenizer
from minivlm.text.tokenizer_base import TextTokenizer

transformers = pytest.importorskip("transformers")
from minivlm.interop.reference import bytelevel_tokenizer, llama_tokenizer  # noqa: E402

ADDED = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<row_1_col_1>"]


@pytest.fixture(scope="module", params=["bytelevel", "llama"])
def pair(request, tmp_path_factory):
    """(transformers' fast tokenizer, minivlm's HFTokenizer) read from the same saved directory."""
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "bytelevel":
        fast = PreTrainedTokenizerFast(tokenizer_object=bytelevel_tokenizer(ADDED), bos_token="<|im_start|>",
                                       eos_token="<|im_end|>", pad_token="<|im_end|>")
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=llama_tokenizer(ADDED), bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>")
    fast.save_pretrained(directory)
    ours = HFTokenizer.from_pretrained(directory, image_token="<image>", end_of_turn_token="<end_of_utterance>")
    return fast, ours, directory


def test_is_a_text_tokenizer_and_every_added_token_keeps_its_id(pair):
    fast, ours, directory = pair
    assert isinstance(ours, TextTokenizer) and isinstance(load_tokenizer(directory), HFTokenizer)
    assert ours.vocab_size == len(fast)
    for token in ADDED + [fast.bos_token, fast.eos_token]:
        assert ours.token_to_id(token) == fast.convert_tokens_to_ids(token)
    assert ours.image_token_id == fast.convert_tokens_to_ids("<image>")
    assert ours.im_end_id == ours.end_of_turn_id == fast.convert_tokens_to_ids("<end_of_utterance>")


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abcdefghij ASTU?.,:0123\n")), max_size=40))
def test_plain_text_encodes_as_transformers_encodes_it(pair, text):
    fast, ours, _ = pair
    assert ours.encode(text) == fast.encode(text, add_special_tokens=False)


def test_text_that_spells_a_special_token_stays_text(pair):
    fast, ours, _ = pair
    ids = ours.encode("look: <image> and <end_of_utterance>")
    assert ours.image_token_id not in ids and ours.end_of_turn_id not in ids
    assert "<image>" in ours.decode(ids)
    assert ours.image_token_id in ours.encode("<image>", parse_special=True)


def test_the_post_processor_prefix_is_known(pair):
    fast, ours, _ = pair
    assert ours.prefix_ids == fast.encode("x")[: len(fast.encode("x")) - len(fast.encode("x", add_special_tokens=False))]
    assert ours.suffix_ids == []


def test_roles_survive_saving_and_pickling(pair, tmp_path):
    _, ours, _ = pair
    grown = ours.with_special_tokens(["<video>"], pad_token="<video>")
    assert grown.token_to_id("<video>") == ours.vocab_size and grown.pad_id == ours.vocab_size
    grown.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.roles == grown.roles and again.vocab_size == grown.vocab_size
    assert pickle.loads(pickle.dumps(again)).encode("What is this?") == grown.encode("What is this?")


def test_a_role_the_vocabulary_lacks_is_an_error(pair):
    _, _, directory = pair
    with pytest.raises(ValueError, match="no token for image_token='<picture>'"):
        HFTokenizer.from_pretrained(directory, image_token="<picture>")
    with pytest.raises(ValueError, match="unknown tokenizer role"):
        HFTokenizer.from_pretrained(directory, colour_token="<image>")
