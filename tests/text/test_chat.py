"""Chat format: HF and LLaVA inputs, the ChatML template, supervision flags, and every bad input."""

from __future__ import annotations

import pytest
from PIL import Image

from minivlm.text.chat import (
    IGNORE_INDEX,
    ChatFormatError,
    EmptyContentError,
    ImagePart,
    MediaNotAllowedError,
    MediaSegment,
    Message,
    MissingAssistantTurnError,
    MissingMediaError,
    SpecialSegment,
    TextPart,
    TextSegment,
    UnknownContentTypeError,
    UnknownRoleError,
    VideoPart,
    chat_segments,
    encode_segments,
    from_llava,
    image_segments,
    merge_text_segments,
    normalize_messages,
    segments_to_text,
    validate_conversation,
    video_frame_segments,
)

RED = Image.new("RGB", (64, 64), "red")
BLUE = Image.new("RGB", (64, 64), "blue")


def text_only_conversation():
    return [
        {"role": "system", "content": "You read charts."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]


# ---- normalisation -----------------------------------------------------------------------------
def test_hf_string_and_list_content():
    messages = normalize_messages(
        [
            {"role": "user", "content": [{"type": "image", "image": RED}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "42"},
        ]
    )
    assert messages == [
        Message("user", (ImagePart(RED), TextPart("What?"))),
        Message("assistant", (TextPart("42"),)),
    ]
    assert messages[0].media == (ImagePart(RED),)
    assert messages[0].text == "What?"


@pytest.mark.parametrize("key", ["image", "url", "path"])
def test_image_source_keys(key):
    (message,) = normalize_messages([{"role": "user", "content": [{"type": "image", key: "/data/cat.png"}]}])
    assert message.parts == (ImagePart("/data/cat.png"),)


def test_video_item_with_fps():
    frames = [RED, BLUE]
    (message,) = normalize_messages([{"role": "user", "content": [{"type": "video", "video": frames, "fps": 2}]}])
    assert message.parts == (VideoPart(frames, fps=2.0),)


def test_image_token_in_hf_text_stays_text():
    (message,) = normalize_messages([{"role": "user", "content": "<image>\nWhat?"}])
    assert message.parts == (TextPart("<image>\nWhat?"),)


def test_empty_text_items_are_dropped():
    content = [{"type": "text", "text": ""}, {"type": "text", "text": "Hi"}]
    (message,) = normalize_messages([{"role": "user", "content": content}])
    assert message.parts == (TextPart("Hi"),)


def test_normalised_messages_pass_through():
    messages = [Message("user", (TextPart("Hi"),)), Message("assistant", (TextPart("Yo"),))]
    assert normalize_messages(messages) == messages


# ---- LLaVA -------------------------------------------------------------------------------------
def test_llava_equals_hf_format():
    llava = from_llava(
        [
            {"from": "system", "value": "You read charts."},
            {"from": "human", "value": "<image>\nWhat is the highest value?"},
            {"from": "gpt", "value": "42"},
            {"from": "human", "value": "Compare with <image> please."},
            {"from": "gpt", "value": "Bluer."},
        ],
        images=[RED, BLUE],
    )
    hf = normalize_messages(
        [
            {"role": "system", "content": "You read charts."},
            {
                "role": "user",
                "content": [{"type": "image", "image": RED}, {"type": "text", "text": "What is the highest value?"}],
            },
            {"role": "assistant", "content": "42"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare with "},
                    {"type": "image", "image": BLUE},
                    {"type": "text", "text": " please."},
                ],
            },
            {"role": "assistant", "content": "Bluer."},
        ]
    )
    assert llava == hf


@pytest.mark.parametrize(
    "value, parts",
    [
        ("<image>\nQ", (ImagePart(RED), TextPart("Q"))),
        ("Q\n<image>", (TextPart("Q"), ImagePart(RED))),
        ("Q\n\n<image>\n\nR", (TextPart("Q\n"), ImagePart(RED), TextPart("\nR"))),
        ("A <image> B", (TextPart("A "), ImagePart(RED), TextPart(" B"))),
        ("Q", (ImagePart(RED), TextPart("Q"))),  # no placeholder, one image: LLaVA puts it first
    ],
)
def test_llava_newline_next_to_a_placeholder_only_separates(value, parts):
    messages = from_llava([{"from": "human", "value": value}, {"from": "gpt", "value": "x"}], images=[RED])
    assert messages[0].parts == parts


def test_llava_single_image_path_and_video():
    messages = from_llava(
        [{"from": "human", "value": "<video>then<image>"}, {"from": "gpt", "value": "ok"}],
        images="a.png",
        videos=["clip.gif"],
    )
    assert messages[0].parts == (VideoPart("clip.gif"), TextPart("then"), ImagePart("a.png"))


def test_llava_more_placeholders_than_images():
    with pytest.raises(MissingMediaError, match="placeholder number 2 but only 1 images"):
        from_llava([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}], images=[RED])


def test_llava_unused_images():
    with pytest.raises(ChatFormatError, match="2 images were given but the conversation has only 1"):
        from_llava([{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "x"}], images=[RED, BLUE])


def test_llava_image_in_gpt_turn():
    with pytest.raises(MediaNotAllowedError, match="assistant"):
        from_llava([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "<image>"}], images=[RED])


@pytest.mark.parametrize(
    "turn, error, match",
    [
        ({"from": "bot", "value": "x"}, UnknownRoleError, "'bot'"),
        ({"from": "human", "value": ""}, EmptyContentError, "empty content"),
        ({"from": "human", "value": 3}, ChatFormatError, "int 'value'"),
        ({"from": "human"}, ChatFormatError, "'from' and 'value'"),
    ],
)
def test_llava_bad_turns(turn, error, match):
    with pytest.raises(error, match=match):
        from_llava([turn])


# ---- validation errors ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "messages, error, match",
    [
        ([{"role": "tool", "content": "x"}], UnknownRoleError, "role 'tool'"),
        ([{"role": "user", "content": ""}], EmptyContentError, "empty content"),
        ([{"role": "user", "content": []}], EmptyContentError, "empty content"),
        ([{"role": "user", "content": [{"type": "text", "text": ""}]}], EmptyContentError, "empty content"),
        ([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}], UnknownContentTypeError, "'audio'"),
        ([{"role": "user", "content": [{"type": "image"}]}], MissingMediaError, "image item with no image"),
        ([{"role": "user", "content": [{"type": "image", "image": None}]}], MissingMediaError, "no image"),
        ([{"role": "user", "content": [{"type": "video"}]}], MissingMediaError, "video item with no video"),
        (
            [{"role": "user", "content": "Q"}, {"role": "assistant", "content": [{"type": "image", "image": RED}]}],
            MediaNotAllowedError,
            r"message #1 \(assistant\)",
        ),
        ([{"role": "system", "content": [{"type": "image", "image": RED}]}], MediaNotAllowedError, "system"),
        ([{"role": "user", "content": "Q"}, {"role": "system", "content": "S"}], ChatFormatError, "only come first"),
        ([{"role": "user", "content": 5}], ChatFormatError, "str or a list"),
        ([{"role": "user", "content": ["bare string"]}], ChatFormatError, "dict with a 'type'"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], ChatFormatError, "expected str"),
        ([{"role": "user", "content": [{"type": "video", "video": [RED], "fps": 0}]}], ChatFormatError, "fps=0"),
        ([{"role": "user"}], ChatFormatError, "'role' and 'content'"),
        (["user: hi"], ChatFormatError, "must be a dict"),
        ([], EmptyContentError, "no messages"),
        ({"role": "user", "content": "Q"}, ChatFormatError, "list of messages"),
    ],
)
def test_bad_conversations(messages, error, match):
    with pytest.raises(error, match=match):
        normalize_messages(messages)


def test_every_chat_error_is_a_value_error():
    for error in (UnknownRoleError, EmptyContentError, UnknownContentTypeError, MissingMediaError,
                  MediaNotAllowedError, MissingAssistantTurnError):
        assert issubclass(error, ChatFormatError) and issubclass(error, ValueError)


def test_training_needs_an_assistant_turn():
    messages = normalize_messages([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    validate_conversation(messages)  # fine for a generation prompt
    with pytest.raises(MissingAssistantTurnError, match=r"roles \['system', 'user'\]"):
        validate_conversation(messages, for_training=True)


# ---- template ---------------------------------------------------------------------------------
def test_chatml_template_text():
    segments = chat_segments(normalize_messages(text_only_conversation()))
    assert segments_to_text(segments) == (
        "<|im_start|>system\nYou read charts.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\nGoodbye<|im_end|>\n"
    )


def test_generation_prompt():
    segments = chat_segments(normalize_messages([{"role": "user", "content": "Hi"}]), add_generation_prompt=True)
    assert segments_to_text(segments) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not any(s.supervised for s in segments)


def test_only_answers_and_their_im_end_are_supervised():
    segments = chat_segments(normalize_messages(text_only_conversation()))
    supervised = [(type(s).__name__, getattr(s, "text", getattr(s, "token", None))) for s in segments if s.supervised]
    assert supervised == [
        ("TextSegment", "Hello"),
        ("SpecialSegment", "<|im_end|>"),
        ("TextSegment", "Goodbye"),
        ("SpecialSegment", "<|im_end|>"),
    ]


def test_media_stays_a_placeholder_in_order():
    messages = normalize_messages(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": RED},
                    {"type": "text", "text": "vs"},
                    {"type": "image", "image": BLUE},
                ],
            }
        ]
    )
    media = [s.part for s in chat_segments(messages) if isinstance(s, MediaSegment)]
    assert media == [ImagePart(RED), ImagePart(BLUE)]
    with pytest.raises(ValueError, match="media expanded first"):
        segments_to_text(chat_segments(messages))


def test_adjacent_text_is_merged_by_supervision():
    merged = merge_text_segments(
        [
            TextSegment("a"),
            TextSegment("b"),
            TextSegment("c", True),
            SpecialSegment("<image>"),
            TextSegment("d"),
            TextSegment("e"),
        ]
    )
    assert merged == [TextSegment("ab"), TextSegment("c", True), SpecialSegment("<image>"), TextSegment("de")]


def test_unsplit_image_layout():
    assert segments_to_text(image_segments(3)) == "<image><image><image>"


def test_split_image_layout_smolvlm_style():
    assert segments_to_text(image_segments(2, rows=2, cols=3)) == (
        "<row_1_col_1><image><image><row_1_col_2><image><image><row_1_col_3><image><image>\n"
        "<row_2_col_1><image><image><row_2_col_2><image><image><row_2_col_3><image><image>\n"
        "<global-img><image><image>"
    )


@pytest.mark.parametrize(
    "seq_len, rows, cols, match", [(0, 0, 0, "image_seq_len"), (1, 2, 0, "both 0"), (1, -1, -1, "both 0")]
)
def test_image_layout_errors(seq_len, rows, cols, match):
    with pytest.raises(ValueError, match=match):
        image_segments(seq_len, rows, cols)


def test_video_frame_layout():
    assert segments_to_text(video_frame_segments(62.5, 2)) == "01:02 <image><image>"


def test_encode_segments_labels(tokenizer):
    segments = [
        TextSegment("user\n"),
        SpecialSegment("<image>", repeat=3),
        TextSegment("42", True),
        SpecialSegment("<|im_end|>", True),
    ]
    ids, labels = encode_segments(segments, tokenizer)
    answer = tokenizer.encode("42")
    assert ids == tokenizer.encode("user\n") + [tokenizer.image_token_id] * 3 + answer + [tokenizer.im_end_id]
    n_unsupervised = len(tokenizer.encode("user\n")) + 3
    assert labels == [IGNORE_INDEX] * n_unsupervised + answer + [tokenizer.im_end_id]
    assert tokenizer.decode(ids) == segments_to_text(segments)
