"""Processor: conversations to ids, labels and pixels that line up; truncation; batching; packing."""

from __future__ import annotations

import json
import pickle
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from minivlm.data.collate import pack_collate
from minivlm.text import (
    IGNORE_INDEX,
    MissingAssistantTurnError,
    Processor,
    SampleSkipped,
    SequenceTooLongError,
    Tokenizer,
    from_llava,
)
from minivlm.vision import ImageLoadError, ImageProcessor, ImageProcessorConfig

SEQ = 4  # image_seq_len of the `processor` fixture (tests/text/conftest.py)
SYSTEM = "You are a helpful assistant that reads chart images."
QUESTION = "What is the highest value in the bar chart?"


def solid(color, size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


def seed_conversation(image):
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "42"},
    ]


SEED_TEXT = (
    f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    f"<|im_start|>user\n{'<image>' * SEQ}{QUESTION}<|im_end|>\n"
    "<|im_start|>assistant\n42<|im_end|>\n"
)


def supervised_tokens(sample):
    return [i for i, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]


# ---- the seed conversation -----------------------------------------------------------------------
@pytest.mark.parametrize("tokenizer_fixture", ["tokenizer", "mistral_tokenizer"])
def test_seed_conversation(tokenizer_fixture, request, image_processor):
    tok = request.getfixturevalue(tokenizer_fixture)
    processor = Processor(tok, image_processor, SEQ)
    image = solid("red")
    sample = processor.render(seed_conversation(image))

    assert tok.decode(sample.input_ids) == SEED_TEXT
    assert processor.render_text(seed_conversation(image)) == SEED_TEXT
    answer = tok.encode("42")
    newline = tok.encode("\n")
    n_prefix = len(sample.input_ids) - len(answer) - 1 - len(newline)
    assert sample.labels == [IGNORE_INDEX] * n_prefix + answer + [tok.im_end_id] + [IGNORE_INDEX] * len(newline)
    assert sample.input_ids[n_prefix:] == answer + [tok.im_end_id] + newline
    assert sample.n_supervised == len(answer) + 1
    assert sample.input_ids.count(tok.image_token_id) == SEQ
    torch.testing.assert_close(sample.pixel_values, image_processor(image).pixel_values, rtol=0, atol=0)
    assert not sample.truncated


def test_generation_prompt_for_the_seed_question(processor, tokenizer):
    prompt = seed_conversation(solid("red"))[:2]
    sample = processor.render(prompt, add_generation_prompt=True)
    assert tokenizer.decode(sample.input_ids) == SEED_TEXT.split("42")[0]
    assert sample.n_supervised == 0 and set(sample.labels) == {IGNORE_INDEX}


def test_text_only_sample_has_no_pixels(processor):
    sample = processor.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert sample.pixel_values.shape == (0, 3, 64, 64)


def test_image_strings_in_user_text_are_not_placeholders(processor, tokenizer):
    messages = [{"role": "user", "content": "<image> <|im_end|>"}, {"role": "assistant", "content": "no"}]
    sample = processor.render(messages)
    assert tokenizer.image_token_id not in sample.input_ids
    assert sample.input_ids.count(tokenizer.im_end_id) == 2
    assert sample.pixel_values.shape[0] == 0


def test_llava_and_hf_render_identically(processor):
    red, blue = solid("red"), solid("blue")
    llava = from_llava(
        [
            {"from": "human", "value": "<image>\nWhich is bluer, this or <image>?"},
            {"from": "gpt", "value": "The second."},
        ],
        images=[red, blue],
    )
    hf = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": red},
                {"type": "text", "text": "Which is bluer, this or "},
                {"type": "image", "image": blue},
                {"type": "text", "text": "?"},
            ],
        },
        {"role": "assistant", "content": "The second."},
    ]
    a, b = processor.render(llava), processor.render(hf)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    assert torch.equal(a.pixel_values, b.pixel_values)


# ---- random conversations ----------------------------------------------------------------------
WORDS = ["What", " is", " the", " value", "?", "\n", " 42", "é", "<image>", "<|im_end|>", " ", "bars"]
texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map("".join)
user_parts = st.lists(
    st.one_of(texts.map(lambda t: ("text", t)), st.just(("image", None))), min_size=1, max_size=5
).filter(lambda parts: sum(kind == "image" for kind, _ in parts) <= 3)
conversations = st.tuples(
    st.one_of(st.none(), texts),  # system prompt
    # (user turn, answer or None): None gives consecutive user messages or a trailing question.
    st.lists(st.tuples(user_parts, st.one_of(st.none(), texts)), min_size=1, max_size=4).filter(
        lambda turns: any(answer is not None for _, answer in turns)
    ),
)


def build(spec):
    """A random conversation spec -> (HF messages, images in order, reference template text)."""
    system, turns = spec
    messages, images, text = [], [], ""
    if system is not None:
        messages.append({"role": "system", "content": system})
        text += f"<|im_start|>system\n{system}<|im_end|>\n"

    def user(parts):
        nonlocal text
        content, rendered = [], ""
        for kind, value in parts:
            if kind == "text":
                content.append({"type": "text", "text": value})
                rendered += value
            else:
                n = len(images)
                images.append(solid((40 * n % 256, 255 - 25 * n, 90)))
                content.append({"type": "image", "image": images[-1]})
                rendered += "<image>" * SEQ
        messages.append({"role": "user", "content": content})
        text += f"<|im_start|>user\n{rendered}<|im_end|>\n"

    for parts, answer in turns:
        user(parts)
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
            text += f"<|im_start|>assistant\n{answer}<|im_end|>\n"
    return messages, images, text


def expected_supervision(ids, tok):
    """Oracle from the token structure: after <|im_start|> + "assistant\\n", every token up to and
    including the next <|im_end|> is supervised, nothing else is."""
    header = [tok.im_start_id] + tok.encode("assistant\n")
    mask, inside, i = [], False, 0
    while i < len(ids):
        if not inside and ids[i : i + len(header)] == header:
            mask += [False] * len(header)
            i += len(header)
            inside = True
            continue
        mask.append(inside)
        if ids[i] == tok.im_end_id:
            inside = False
        i += 1
    return mask


@settings(max_examples=40, deadline=None)
@given(spec=conversations)
def test_random_conversations_line_up(processor, tokenizer, image_processor, spec):
    messages, images, reference_text = build(spec)
    sample = processor.render(messages)

    assert tokenizer.decode(sample.input_ids) == reference_text
    supervised = [label != IGNORE_INDEX for label in sample.labels]
    assert supervised == expected_supervision(sample.input_ids, tokenizer)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(sample.input_ids, sample.labels))
    assert sample.n_supervised == sum(supervised)
    assert sample.input_ids.count(tokenizer.image_token_id) == sample.pixel_values.shape[0] * SEQ
    assert sample.pixel_values.shape[0] == len(images)
    if images:
        expected = torch.cat([image_processor(image).pixel_values for image in images])
        assert torch.equal(sample.pixel_values, expected)


@settings(max_examples=40, deadline=None)
@given(spec=conversations, cut=st.floats(0.0, 1.0))
def test_truncation_never_splits_an_image(processor, tokenizer, spec, cut):
    messages, _, _ = build(spec)
    full = processor.render(messages)
    limit = max(1, int(cut * len(full.input_ids)))
    truncating = Processor(tokenizer, processor.image_processor, SEQ, max_length=limit)
    # Images sit in user turns, so a cut moved back to an image's start never loses supervision
    # that the first `limit` tokens had: the sample is skipped exactly when those had none.
    if all(label == IGNORE_INDEX for label in full.labels[:limit]):
        with pytest.raises(SampleSkipped):
            truncating.render(messages)
        return
    sample = truncating.render(messages)
    n = len(sample.input_ids)
    assert n <= limit
    assert sample.input_ids == full.input_ids[:n] and sample.labels == full.labels[:n]
    n_views = sample.input_ids.count(tokenizer.image_token_id) // SEQ
    assert sample.input_ids.count(tokenizer.image_token_id) == n_views * SEQ
    assert torch.equal(sample.pixel_values, full.pixel_values[:n_views])
    assert sample.n_supervised > 0
    assert sample.truncated == (len(full.input_ids) > limit)


# ---- truncation, explicitly -------------------------------------------------------------------------
def two_turns_with_late_image():
    return [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "text", "text": "Now look: "}, {"type": "image", "image": solid("red")}]},
        {"role": "assistant", "content": "Red."},
    ]


def test_cut_inside_an_image_drops_the_whole_image(processor, tokenizer):
    messages = two_turns_with_late_image()
    full = processor.render(messages)
    image_start = full.input_ids.index(tokenizer.image_token_id)
    truncating = Processor(tokenizer, processor.image_processor, SEQ, max_length=image_start + 2)
    sample = truncating.render(messages)
    assert sample.input_ids == full.input_ids[:image_start]
    assert sample.pixel_values.shape[0] == 0
    assert sample.truncated
    assert supervised_tokens(sample) == tokenizer.encode("Hello") + [tokenizer.im_end_id]


def test_cut_inside_text_keeps_exactly_max_length(processor, tokenizer):
    messages = two_turns_with_late_image()
    full = processor.render(messages)
    limit = len(full.input_ids) - 3
    sample = Processor(tokenizer, processor.image_processor, SEQ, max_length=limit).render(messages)
    assert sample.input_ids == full.input_ids[:limit]
    assert sample.pixel_values.shape[0] == 1


def test_exact_fit_is_not_truncated(processor, tokenizer):
    messages = two_turns_with_late_image()
    full = processor.render(messages)
    sample = Processor(tokenizer, processor.image_processor, SEQ, max_length=len(full.input_ids)).render(messages)
    assert sample.input_ids == full.input_ids and not sample.truncated


def test_sample_without_surviving_supervision_is_skipped(processor, tokenizer):
    messages = seed_conversation(solid("red"))
    full = processor.render(messages)
    first_supervised = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    truncating = Processor(tokenizer, processor.image_processor, SEQ, max_length=first_supervised)
    with pytest.raises(SampleSkipped, match="no supervised token left") as caught:
        truncating.render(messages)
    assert isinstance(caught.value, ValueError)
    assert "max_length" in caught.value.reason


def test_strict_mode_refuses_to_truncate(processor, tokenizer):
    strict = Processor(tokenizer, processor.image_processor, SEQ, max_length=10, strict=True)
    with pytest.raises(SequenceTooLongError, match="exceeds max_length=10.*strict"):
        strict.render(seed_conversation(solid("red")))


def test_long_generation_prompt_is_an_error(processor, tokenizer):
    short = Processor(tokenizer, processor.image_processor, SEQ, max_length=10)
    with pytest.raises(SequenceTooLongError, match="generation prompt"):
        short.render(seed_conversation(solid("red"))[:2], add_generation_prompt=True)


# ---- image splitting and video -----------------------------------------------------------------
@pytest.fixture(scope="module")
def split_processor(tokenizer):
    return Processor(tokenizer, ImageProcessor(ImageProcessorConfig(image_size=64, split_image=True, max_tiles=4)), 2)


def test_split_image_tile_markers(split_processor, tokenizer):
    wide = solid("green", size=(128, 64))  # a 1 x 2 grid
    messages = [{"role": "user", "content": [{"type": "image", "image": wide}, {"type": "text", "text": "Q"}]},
                {"role": "assistant", "content": "A"}]
    sample = split_processor.render(messages)
    tiles = "<row_1_col_1><image><image><row_1_col_2><image><image>\n<global-img><image><image>"
    assert tokenizer.decode(sample.input_ids) == (
        f"<|im_start|>user\n{tiles}Q<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )
    assert sample.pixel_values.shape[0] == 3
    assert sample.input_ids.count(tokenizer.image_token_id) == 3 * 2
    torch.testing.assert_close(sample.pixel_values, split_processor.image_processor(wide).pixel_values, rtol=0, atol=0)


def test_split_needs_tile_markers_in_the_vocabulary():
    plain = Tokenizer.train(["a b c d e f"] * 5, vocab_size=300)
    with pytest.raises(ValueError, match="tile markers for max_tiles=0"):
        Processor(plain, ImageProcessor(ImageProcessorConfig(image_size=64, split_image=True, max_tiles=4)), 2)


def test_video_frames_with_timestamps(split_processor, tokenizer):
    frames = [solid(c) for c in ("red", "green", "blue", "white", "black")]
    video_item = {"type": "video", "video": frames, "fps": 0.5}
    messages = [
        {"role": "user", "content": [video_item, {"type": "text", "text": "What moved?"}]},
        {"role": "assistant", "content": "Nothing."},
    ]
    sample = Processor(tokenizer, split_processor.image_processor, 2, video_max_frames=3).render(messages)
    # 5 frames at 0.5 fps are at 0, 2, 4, 6, 8 s; 3 uniform samples pick frames 0, 2, 4.
    video = "00:00 <image><image>00:04 <image><image>00:08 <image><image>"
    assert tokenizer.decode(sample.input_ids) == (
        f"<|im_start|>user\n{video}What moved?<|im_end|>\n<|im_start|>assistant\nNothing.<|im_end|>\n"
    )
    # Frames are never tiled, even by a splitting image processor.
    assert sample.pixel_values.shape[0] == 3
    frame_processor = ImageProcessor(ImageProcessorConfig(image_size=64))
    expected = torch.cat([frame_processor(frames[i]).pixel_values for i in (0, 2, 4)])
    torch.testing.assert_close(sample.pixel_values, expected, rtol=0, atol=0)


@pytest.mark.parametrize("n_frames", [1, 4, 5])
def test_temporal_patches_stack_consecutive_frames(tokenizer, image_processor, n_frames):
    """temporal_patch_size=2: a view holds two consecutive frames on the channel axis; an odd
    clip's last view repeats its last frame; each view sits after its first frame's time."""
    colors = ("red", "green", "blue", "white", "black")[:n_frames]
    frames = [solid(c) for c in colors]
    messages = [
        {"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What moved?"}]},
        {"role": "assistant", "content": "Nothing."},
    ]
    processor = Processor(tokenizer, image_processor, 2, video_max_frames=8, temporal_patch_size=2)
    sample = processor.render(messages)
    n_views = (n_frames + 1) // 2
    assert sample.pixel_values.shape == (n_views, 6, 64, 64)
    video = "".join(f"00:0{2 * k} <image><image>" for k in range(n_views))  # 1 fps: frame i at i s
    assert tokenizer.decode(sample.input_ids).startswith(f"<|im_start|>user\n{video}What moved?")
    single = [image_processor(f).pixel_values[0] for f in frames]
    for k in range(n_views):
        first, second = 2 * k, min(2 * k + 1, n_frames - 1)
        torch.testing.assert_close(sample.pixel_values[k, :3], single[first], rtol=0, atol=0)
        torch.testing.assert_close(sample.pixel_values[k, 3:], single[second], rtol=0, atol=0)


def test_temporal_patches_show_an_image_as_a_still(tokenizer, image_processor):
    image = solid((10, 200, 30), size=(80, 40))
    one = Processor(tokenizer, image_processor, SEQ).render(seed_conversation(image))
    three = Processor(tokenizer, image_processor, SEQ, temporal_patch_size=3).render(seed_conversation(image))
    assert three.input_ids == one.input_ids  # the text does not change, only the views' depth
    assert three.pixel_values.shape == (1, 9, 64, 64)
    for t in range(3):
        torch.testing.assert_close(three.pixel_values[:, 3 * t : 3 * t + 3], one.pixel_values, rtol=0, atol=0)
    empty = Processor(tokenizer, image_processor, SEQ, temporal_patch_size=3).render(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert empty.pixel_values.shape == (0, 9, 64, 64)  # concatenates with other samples' views


# ---- batches ----------------------------------------------------------------------------------
def test_batch_right_padding(processor, tokenizer):
    long = seed_conversation(solid("red"))
    short = [
        {"role": "user", "content": [{"type": "image", "image": solid("blue")}]},
        {"role": "assistant", "content": "Blue."},
    ]
    batch = processor([long, short])
    samples = [processor.render(long), processor.render(short)]
    assert batch["input_ids"].shape == (2, len(samples[0].input_ids))
    n = len(samples[1].input_ids)
    assert batch["input_ids"][1, :n].tolist() == samples[1].input_ids
    assert (batch["input_ids"][1, n:] == tokenizer.pad_id).all()
    assert batch["attention_mask"][1].tolist() == [True] * n + [False] * (batch["input_ids"].shape[1] - n)
    assert torch.equal(batch["pixel_values"], torch.cat([s.pixel_values for s in samples]))


def test_batch_left_padding_for_generation(processor, tokenizer):
    prompts = [seed_conversation(solid("red"))[:2], [{"role": "user", "content": "Hi"}]]
    batch = processor(prompts, add_generation_prompt=True, padding_side="left")
    cue = [tokenizer.im_start_id] + tokenizer.encode("assistant\n")
    for row in range(2):
        assert batch["input_ids"][row, -len(cue):].tolist() == cue
        n = int(batch["attention_mask"][row].sum())
        assert batch["position_ids"][row, -n:].tolist() == list(range(n))
    assert (batch["labels"] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape[0] == 1


def test_batch_without_tensors(processor):
    out = processor([seed_conversation(solid("red"))], return_tensors=False)
    sample = processor.render(seed_conversation(solid("red")))
    assert out["input_ids"] == [sample.input_ids] and out["labels"] == [sample.labels]
    assert torch.equal(out["pixel_values"][0], sample.pixel_values)


def test_batch_errors(processor):
    with pytest.raises(ValueError, match="got a single conversation"):
        processor(seed_conversation(solid("red")))
    with pytest.raises(ValueError, match="padding_side"):
        processor([seed_conversation(solid("red"))], padding_side="middle")
    with pytest.raises(ValueError, match="non-empty list"):
        processor([])


def test_packed_rendered_samples_keep_images_in_placeholder_order(processor, tokenizer, image_processor):
    conversations = []
    for n in range(7):
        content = [{"type": "image", "image": solid((30 * n, 0, 0))}, {"type": "text", "text": "Q" * (1 + 3 * n)}]
        if n % 3 == 0:
            content.append({"type": "image", "image": solid((30 * n, 255, 0))})
        conversations.append([{"role": "user", "content": content}, {"role": "assistant", "content": "A" * n + "!"}])
    samples = [processor.render(c) for c in conversations]
    max_length = max(len(s.input_ids) for s in samples) + 10
    packed = pack_collate(samples, max_length=max_length, pad_id=tokenizer.pad_id)

    # Identify each packed document by its tokens, then expect its views in row-major order.
    by_tokens = {tuple(s.input_ids): s for s in samples}
    expected_views = []
    for row in range(packed["input_ids"].shape[0]):
        ids, docs = packed["input_ids"][row], packed["document_ids"][row]
        for doc in range(int(docs.max()) + 1):
            expected_views.append(by_tokens[tuple(ids[docs == doc].tolist())].pixel_values)
    assert torch.equal(packed["pixel_values"], torch.cat(expected_views))
    assert int((packed["input_ids"] == tokenizer.image_token_id).sum()) == packed["pixel_values"].shape[0] * SEQ
    # Rendered samples start with an unsupervised <|im_start|>, so packing changes no label.
    real = packed["attention_mask"]
    packed_pairs = Counter(zip(packed["input_ids"][real].tolist(), packed["labels"][real].tolist()))
    assert packed_pairs == Counter(p for s in samples for p in zip(s.input_ids, s.labels))


# ---- construction, persistence, errors ---------------------------------------------------------------
def test_save_and_load(processor, tmp_path):
    letterbox = ImageProcessor(ImageProcessorConfig(image_size=64, resize="letterbox"))
    original = Processor(processor.tokenizer, letterbox, SEQ, max_length=512, video_max_frames=3,
                         temporal_patch_size=2)
    original.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processor_config.json", "tokenizer.model"]
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["image_seq_len"] == SEQ and config["max_length"] == 512 and config["video_max_frames"] == 3
    assert config["temporal_patch_size"] == 2
    assert config["image_processor"]["resize"] == "letterbox"
    loaded = Processor.from_pretrained(tmp_path)
    assert loaded.config == original.config
    assert loaded.image_processor.config == original.image_processor.config
    messages = seed_conversation(solid((10, 200, 30), size=(80, 40)))
    a, b = original.render(messages), loaded.render(messages)
    assert a.input_ids == b.input_ids and torch.equal(a.pixel_values, b.pixel_values)


def test_configs_saved_before_temporal_patches_load_as_single_frames(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    del config["temporal_patch_size"]
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    assert Processor.from_pretrained(tmp_path).config.temporal_patch_size == 1


def test_load_errors(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        Processor.from_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    (tmp_path / "processor_config.json").write_text(json.dumps(config | {"image_tokens": 3}))
    with pytest.raises(ValueError, match=r"unknown keys \['image_tokens'\]"):
        Processor.from_pretrained(tmp_path)


def test_processor_pickles_for_dataloader_workers(processor):
    clone = pickle.loads(pickle.dumps(processor))
    messages = seed_conversation(solid("red"))
    assert clone.render(messages).input_ids == processor.render(messages).input_ids


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_seq_len": 0}, "image_seq_len must be a positive int"),
        ({"image_seq_len": 2, "max_length": 0}, "max_length must be a positive int or None"),
        ({"image_seq_len": 2, "video_max_frames": 0}, "video_max_frames must be a positive int"),
        ({"image_seq_len": 2, "strict": "yes"}, "strict must be a bool"),
        ({"image_seq_len": 2, "temporal_patch_size": 0}, "temporal_patch_size must be a positive int"),
    ],
)
def test_bad_settings(tokenizer, image_processor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Processor(tokenizer, image_processor, **kwargs)


def test_render_errors(processor, tmp_path):
    with pytest.raises(MissingAssistantTurnError):
        processor.render([{"role": "user", "content": "Q"}])
    with pytest.raises(ImageLoadError):
        processor.render([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "missing.png")}]},
                          {"role": "assistant", "content": "A"}])
