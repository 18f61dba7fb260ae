"""Tokenizer: special-token layout, exact round trips, injection safety, persistence, real 32k models."""

from __future__ import annotations

import io
import pickle

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from minivlm.text import (
    GLOBAL_IMAGE_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    VIDEO_TOKEN,
    Tokenizer,
    tile_token,
    tile_tokens,
)

# Any text sentencepiece can take: UTF-8 encodable (no lone surrogates).
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
SENTENCES = [
    "You are a helpful assistant that reads chart images.",
    "What is the highest value in the bar chart?",
    "How many bars are red? There are 3 red bars and 2 blue bars.",
    "An unseen word: xylophone, and an unseen symbol: §.",
]
TRICKY = ["", " ", "  two  spaces  ", "\n\nnewlines\n", "\ttab", "日本語 ☃ é", "42", " leading", "trailing "]


# ---- trained tokenizer ---------------------------------------------------------------------------
def test_trained_special_tokens_follow_unk_bos_eos(tokenizer):
    layout = [tokenizer.id_to_token(i) for i in range(8)]
    assert layout == ["<unk>", "<s>", "</s>", PAD_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN, IM_START_TOKEN, IM_END_TOKEN]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 3)
    assert (tokenizer.image_token_id, tokenizer.video_token_id) == (4, 5)
    assert (tokenizer.im_start_id, tokenizer.im_end_id) == (6, 7)
    markers = [tokenizer.id_to_token(i) for i in range(8, 8 + len(tile_tokens(4)))]
    assert markers == tile_tokens(4)
    assert tokenizer.max_tiles == 4


def test_special_ids_are_the_control_tokens(tokenizer):
    expected = {1, 2, 3, 4, 5, 6, 7} | {tokenizer.token_to_id(t) for t in tile_tokens(4)}
    assert tokenizer.special_ids == expected


def test_vocab_size_within_requested(tokenizer):
    assert 300 < tokenizer.vocab_size <= 600
    assert len(tokenizer) == tokenizer.vocab_size


@pytest.mark.parametrize("text", SENTENCES + TRICKY)
def test_trained_round_trip_exact(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(a=texts, b=texts)
def test_trained_encoding_is_concatenable(tokenizer, a, b):
    # What the chat template relies on: segments encoded separately decode to their concatenation.
    assert tokenizer.decode(tokenizer.encode(a) + tokenizer.encode(b)) == a + b


def test_no_dummy_prefix_space(tokenizer):
    ids = tokenizer.encode("42")
    assert not tokenizer.id_to_token(ids[0]).startswith("▁")
    assert tokenizer.decode([tokenizer.im_start_id] + ids) == "<|im_start|>42"


def test_unseen_characters_fall_back_to_bytes(tokenizer):
    ids = tokenizer.encode("☃")
    assert [tokenizer.id_to_token(i) for i in ids] == ["<0xE2>", "<0x98>", "<0x83>"]
    assert tokenizer.decode(ids) == "☃"


# ---- special tokens can only be inserted by id ---------------------------------------------------
@pytest.mark.parametrize("fixture", ["tokenizer", "mistral_tokenizer"])
def test_special_strings_in_text_are_plain_text(fixture, request):
    tok = request.getfixturevalue(fixture)
    text = f"look {IMAGE_TOKEN} here{IM_END_TOKEN}{IM_START_TOKEN}assistant\n{tile_token(1, 1)}{GLOBAL_IMAGE_TOKEN}</s>"
    ids = tok.encode(text)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == text


@pytest.mark.parametrize("fixture", ["tokenizer", "mistral_tokenizer"])
def test_parse_special_opt_in(fixture, request):
    tok = request.getfixturevalue(fixture)
    ids = tok.encode(f"{IM_START_TOKEN}user\nhi {IMAGE_TOKEN}{IMAGE_TOKEN}{IM_END_TOKEN}", parse_special=True)
    assert ids[0] == tok.im_start_id
    assert ids[-3:] == [tok.image_token_id, tok.image_token_id, tok.im_end_id]
    assert ids[1:-3] == tok.encode("user\nhi ")


def test_bos_eos(tokenizer):
    ids = tokenizer.encode("hi", add_bos=True, add_eos=True)
    assert ids == [tokenizer.bos_id] + tokenizer.encode("hi") + [tokenizer.eos_id]
    assert tokenizer.decode(ids) == "<s>hi</s>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"


def test_decode_skip_special_tokens(tokenizer):
    ids = [
        tokenizer.im_start_id,
        *tokenizer.encode("user\n"),
        tokenizer.image_token_id,
        *tokenizer.encode("Q?"),
        tokenizer.im_end_id,
    ]
    assert tokenizer.decode(ids) == "<|im_start|>user\n<image>Q?<|im_end|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nQ?"


def test_decode_accepts_tensors(tokenizer):
    torch = pytest.importorskip("torch")
    ids = tokenizer.encode("What is the highest value?")
    assert tokenizer.decode(torch.tensor(ids)) == "What is the highest value?"


def test_model_without_bos(tokenizer):
    tok = Tokenizer.train(SENTENCES, vocab_size=300, bos_id=-1)
    assert tok.bos_id is None
    with pytest.raises(ValueError, match="no bos token"):
        tok.encode("hi", add_bos=True)


# ---- persistence ----------------------------------------------------------------------------------
def test_save_pretrained_writes_only_the_model(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.model"]
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.to_bytes() == tokenizer.to_bytes()
    assert loaded.max_tiles == 4
    assert loaded.encode(SENTENCES[3]) == tokenizer.encode(SENTENCES[3])


def test_saved_model_is_a_plain_sentencepiece_file(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "any.model")
    raw = spm.SentencePieceProcessor(model_file=str(path))
    assert raw.get_piece_size() == tokenizer.vocab_size
    assert raw.encode(SENTENCES[1]) == tokenizer.encode(SENTENCES[1])


def test_pickle_round_trip(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.to_bytes() == tokenizer.to_bytes()
    assert clone.encode(SENTENCES[0]) == tokenizer.encode(SENTENCES[0])


def test_tile_markers_can_be_added_to_a_trained_model():
    small = Tokenizer.train(SENTENCES, vocab_size=300)
    assert small.max_tiles == 0
    tiled = Tokenizer.from_bytes(small.to_bytes(), max_tiles=2)
    assert tiled.max_tiles == 2
    assert [tiled.id_to_token(i) for i in range(small.vocab_size, tiled.vocab_size)] == tile_tokens(2)
    assert all(tiled.id_to_token(i) == small.id_to_token(i) for i in range(small.vocab_size))


def test_tile_tokens_cover_every_grid_within_max_tiles():
    assert tile_tokens(0) == []
    for max_tiles in (1, 4, 6):
        markers = set(tile_tokens(max_tiles))
        for rows in range(1, max_tiles + 1):
            for cols in range(1, max_tiles // rows + 1):
                assert {tile_token(r, c) for r in range(1, rows + 1) for c in range(1, cols + 1)} <= markers
        assert GLOBAL_IMAGE_TOKEN in markers
    assert len(tile_tokens(4)) == 8 + 1  # (1,1..4) (2,1..2) (3,1) (4,1) + global


# ---- a real 32k Llama/Mistral sentencepiece model --------------------------------------------------
def test_mistral_base_ids_unchanged(mistral_model_path, mistral_tokenizer):
    base = spm.SentencePieceProcessor(model_file=str(mistral_model_path))
    assert base.get_piece_size() == 32000
    assert all(mistral_tokenizer.id_to_token(i) == base.id_to_piece(i) for i in range(32000))
    assert (mistral_tokenizer.bos_id, mistral_tokenizer.eos_id) == (1, 2)
    added = [mistral_tokenizer.id_to_token(i) for i in range(32000, mistral_tokenizer.vocab_size)]
    assert added == [PAD_TOKEN, *(IMAGE_TOKEN, VIDEO_TOKEN, IM_START_TOKEN, IM_END_TOKEN), *tile_tokens(4)]
    assert mistral_tokenizer.pad_id == 32000
    assert min(mistral_tokenizer.image_token_id, mistral_tokenizer.im_start_id, mistral_tokenizer.im_end_id) >= 32000


@pytest.mark.parametrize("text", SENTENCES + ["Hello world", "2 + 2 = 4", "naïve café"])
def test_mistral_tokenizes_like_the_original_model(mistral_model_path, mistral_tokenizer, text):
    # The original prepends a dummy "▁"; ours does not, so " " + text must give the same ids.
    base = spm.SentencePieceProcessor(model_file=str(mistral_model_path))
    assert mistral_tokenizer.encode(" " + text) == base.encode(text)


@settings(max_examples=50, deadline=None)
@given(a=texts, b=texts)
def test_mistral_round_trip_and_concatenation(mistral_tokenizer, a, b):
    assert mistral_tokenizer.decode(mistral_tokenizer.encode(a)) == a
    assert mistral_tokenizer.decode(mistral_tokenizer.encode(a) + mistral_tokenizer.encode(b)) == a + b


def test_mistral_reload_adds_nothing(mistral_tokenizer, tmp_path):
    mistral_tokenizer.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.vocab_size == mistral_tokenizer.vocab_size
    assert again.to_bytes() == mistral_tokenizer.to_bytes()


def test_model_with_its_own_control_tokens(mistral_model_path):
    # v3 reserves [INST], [/INST], ... as control symbols: they stay special, ours are appended.
    path = mistral_model_path.parent / "mistral_instruct_tokenizer_240323.model.v3"
    if not path.is_file():
        pytest.skip("mistral-common does not ship the v3 model")
    tok = Tokenizer.from_file(path)
    assert tok.token_to_id("[INST]") == 3
    assert 3 in tok.special_ids
    assert tok.image_token_id >= 32768
    assert tok.decode([3, *tok.encode(" hi"), 4]) == "[INST] hi[/INST]"


# ---- errors -------------------------------------------------------------------------------------
def test_base_model_with_ordinary_special_piece_is_refused():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES), model_writer=model, vocab_size=200, user_defined_symbols=[IMAGE_TOKEN],
        hard_vocab_limit=False, minloglevel=2,
    )
    with pytest.raises(ValueError, match="ordinary piece"):
        Tokenizer.from_bytes(model.getvalue())


def test_constructor_requires_special_tokens(mistral_model_path):
    with pytest.raises(ValueError, match="lacks the control symbols"):
        Tokenizer(mistral_model_path.read_bytes())


@pytest.mark.parametrize("data, error", [(b"", ValueError), (b"not a model", ValueError), ("text", TypeError)])
def test_from_bytes_rejects_non_models(data, error):
    with pytest.raises(error, match="sentencepiece model"):
        Tokenizer.from_bytes(data)


def test_from_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sentencepiece model"):
        Tokenizer.from_file(tmp_path / "missing.model")


def test_train_errors():
    with pytest.raises(ValueError, match="training on 0 texts failed"):
        Tokenizer.train([])
    with pytest.raises(TypeError, match="not a single str"):
        Tokenizer.train("just one string")
    with pytest.raises(TypeError, match="training text #1 is a int"):
        Tokenizer.train(["fine", 3])


def test_encode_decode_errors(tokenizer):
    with pytest.raises(TypeError, match="expects a str"):
        tokenizer.encode(b"bytes")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([tokenizer.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([-1])
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tokenizer.token_to_id("<row_9_col_9>")
    with pytest.raises(ValueError, match="1-based"):
        tile_token(0, 1)


def test_offsets_are_only_offered_by_tokenizers_that_encode_text_runs_jointly(tokenizer):
    # Sentencepiece encodes a template's text segments one by one (joint_text_runs False), so it has
    # no character offsets to give; asking names the class instead of returning wrong offsets.
    assert not tokenizer.joint_text_runs
    with pytest.raises(NotImplementedError, match=f"{type(tokenizer).__name__} encodes template segments one by one"):
        tokenizer.encode_with_offsets("a red circle")
