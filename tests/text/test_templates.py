"""Chat templates render exactly what transformers' ``apply_chat_template`` renders with the
model family's Jinja template, and supervise exactly the assistant answers (plus the token that
ends them, where the format has one)."""
from __future__ import annotations

import pytest

from minivlm.text.chat import normalize_messages
from minivlm.text.segments import IGNORE_INDEX, MediaSegment, TextSegment, segments_to_text
from minivlm.text.templates import TEMPLATES, ChatMLTemplate, Idefics3Template, LlavaTemplate, number_words, \
    template_from_dict

transformers = pytest.importorskip("transformers")

IMG = {"type": "image", "image": "unused.png"}
CONVERSATIONS = {
    "image first": [{"role": "user", "content": [IMG, {"type": "text", "text": "What is this?"}]}],
    "text first": [{"role": "user", "content": [{"type": "text", "text": "Look:"}, IMG]}],
    "system and turns": [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [IMG, IMG, {"type": "text", "text": "Compare them."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The first is red."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the second?"}]}],
    "answered": [{"role": "user", "content": [IMG, {"type": "text", "text": "Colour?"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "Green."}]}],
}


def rendered(template, messages, add_generation_prompt: bool) -> str:
    segments = template.segments(normalize_messages(messages), add_generation_prompt=add_generation_prompt)
    return segments_to_text([TextSegment(template.image_token) if isinstance(s, MediaSegment) else s for s in segments])


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from minivlm.interop.reference import bytelevel_tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=bytelevel_tokenizer([]), bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("template", [Idefics3Template(), LlavaTemplate(), ChatMLTemplate()], ids=lambda t: t.kind)
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_equals_transformers_apply_chat_template(template, name, add_generation_prompt, hf_tokenizer):
    messages = CONVERSATIONS[name]
    hf_messages = [{**m, "content": [{"type": "image"} if c["type"] == "image" else c for c in m["content"]]}
                   for m in messages]
    theirs = hf_tokenizer.apply_chat_template(hf_messages, chat_template=template.jinja, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    assert rendered(template, messages, add_generation_prompt) == theirs


def test_string_content_renders_as_transformers_renders_it(hf_tokenizer):
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]
    for template in (Idefics3Template(), ChatMLTemplate()):
        theirs = hf_tokenizer.apply_chat_template(messages, chat_template=template.jinja, tokenize=False,
                                                  add_generation_prompt=True)
        assert rendered(template, messages, True) == theirs


@pytest.mark.parametrize("kind, expected", [("smolvlm", "There are 3.<end_of_utterance>There is one."
                                                         "<end_of_utterance>"),
                                             ("llava", "There are 3.There is one.")])
def test_labels_cover_exactly_the_answers(kind, expected, tmp_path_factory):
    from minivlm.interop.convert import import_checkpoint
    from minivlm.interop.reference import save_llava, save_smolvlm
    from minivlm.text.processor import Processor

    root = tmp_path_factory.mktemp(kind)
    hf = (save_smolvlm if kind == "smolvlm" else save_llava)(root / "hf")
    processor = Processor.from_pretrained(import_checkpoint(kind, hf, root / "minivlm"))
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (40, 30), "red")},
                                             {"type": "text", "text": "How many shapes are there?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "There are 3."}]},
                {"role": "user", "content": [{"type": "text", "text": "And circles?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "There is one."}]}]
    sample = processor.render(messages)
    supervised = [label for label in sample.labels if label != IGNORE_INDEX]
    answers = processor.tokenizer.decode(supervised).replace(" ", "")
    assert answers == expected.replace(" ", "")
    assert len(sample.labels) == len(sample.input_ids)
    assert all(label == token for label, token in zip(sample.labels, sample.input_ids) if label != IGNORE_INDEX)


def test_a_template_is_data_saved_and_restored():
    for kind in TEMPLATES.names():
        template = TEMPLATES.get(kind)()
        assert template_from_dict(template.to_dict()) == template and template.to_dict()["kind"] == kind
    assert isinstance(template_from_dict(None), ChatMLTemplate)  # checkpoints from before templates
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        template_from_dict({"kind": "vicuna"})
    with pytest.raises(ValueError, match="unknown field"):
        template_from_dict({"kind": "llava", "eos": "</s>"})


def test_number_words_spell_frame_counts_as_num2words():
    num2words = pytest.importorskip("num2words").num2words
    for n in list(range(0, 1200)) + [2000, 2001, 12345, 999999]:
        assert number_words(n) == num2words(n)
    with pytest.raises(ValueError):
        number_words(-1)


def test_a_template_kind_must_implement_the_three_layouts():
    from minivlm.text.templates.base import ChatTemplate

    class SegmentsOnly(ChatTemplate):
        kind = "segments_only"

        def segments(self, messages, *, add_generation_prompt=False):
            return []

    with pytest.raises(TypeError, match="abstract.*image_layout.*video_layout"):
        SegmentsOnly()
