"""A sentencepiece-only checkpoint (a ``tokenizer.model`` whose Hugging Face added tokens live in
``tokenizer_config.json``) keeps those tokens at their ids, as llava-hf's ``<image>`` = 32000."""
from __future__ import annotations

import pytest

from minivlm.text import Tokenizer


def test_added_tokens_land_at_their_ids_before_minivlms_own(mistral_model_path):
    tokenizer = Tokenizer.from_bytes(mistral_model_path.read_bytes(), placed={32000: "<image>", 32001: "<pad>"})
    assert tokenizer.image_token_id == 32000 and tokenizer.token_to_id("<pad>") == 32001
    assert tokenizer.pad_id == 32001
    assert tokenizer.token_to_id("<|im_end|>") > 32001  # minivlm's other tokens follow


def test_a_gap_or_a_clash_is_refused(mistral_model_path):
    with pytest.raises(ValueError, match="without gaps"):
        Tokenizer.from_bytes(mistral_model_path.read_bytes(), placed={32005: "<image>"})
    with pytest.raises(ValueError, match="id 1 is '<s>' in the model"):
        Tokenizer.from_bytes(mistral_model_path.read_bytes(), placed={1: "<image>"})
