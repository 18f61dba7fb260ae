"""What rendering refuses: a conversation nobody asked anything in, and text that is not Unicode."""

from __future__ import annotations

import pytest

from minivlm.text.chat import (
    ChatFormatError,
    MissingUserTurnError,
    TextEncodingError,
    check_text_encoding,
    normalize_messages,
)

SYSTEM = {"role": "system", "content": "You answer questions about images."}
ANSWER = {"role": "assistant", "content": "a red circle"}


@pytest.mark.parametrize("messages", [[SYSTEM], [ANSWER], [SYSTEM, ANSWER]])
@pytest.mark.parametrize("generation", [True, False])
def test_a_conversation_without_a_user_turn_is_not_rendered(processor, messages, generation):
    with pytest.raises(MissingUserTurnError, match=r"no user message \(roles \[.*\]\); a model answers a user turn"):
        processor.render(messages, add_generation_prompt=generation)


def test_with_a_user_turn_it_renders(processor):
    sample = processor.render([SYSTEM, {"role": "user", "content": "What is it?"}, ANSWER])
    assert sample.n_supervised > 0


def test_text_that_is_not_utf8_is_refused_naming_the_byte():
    question = b"Is it a caf\xe9?".decode("utf-8", errors="surrogateescape")  # a Latin-1 byte read as UTF-8
    with pytest.raises(TextEncodingError) as caught:
        normalize_messages([{"role": "user", "content": question}])
    assert str(caught.value) == ("message #0 (user) text has byte 0xe9, which is not UTF-8, at character 11 "
                                 "('Is it a caf' before it); expected UTF-8 text")
    assert isinstance(caught.value, ChatFormatError) and isinstance(caught.value, ValueError)


def test_a_lone_surrogate_is_refused_and_real_unicode_is_not():
    with pytest.raises(TextEncodingError, match="lone surrogate U\\+D800 at character 1"):
        check_text_encoding("a\ud800", "the question")
    check_text_encoding("café ☕ 日本", "the question")
