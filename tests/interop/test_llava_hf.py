"""llava-hf checkpoints through `minivlm import llava`: a complete checkpoint (tokenizer with its
added tokens at their ids, pad-to-square image processing, the LLaVA-1.5 template) whose inputs,
logits and greedy generation equal transformers' ``LlavaProcessor`` + ``LlavaForConditionalGeneration``."""
from __future__ import annotations

import pytest
import torch

from paritykit import IMAGE_SIZES, assert_same_run, conversations, hf_content, image, images_of

transformers = pytest.importorskip("transformers")

from minivlm.interop.convert import import_checkpoint  # noqa: E402
from minivlm.interop.reference import save_llava  # noqa: E402
from minivlm.model import VisionLanguageModel  # noqa: E402


@pytest.fixture(scope="module", params=[True, False], ids=["pad-to-square", "crop"])
def pair(request, tmp_path_factory):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    root = tmp_path_factory.mktemp("llava")
    hf_dir = save_llava(root / "hf", pad_to_square=request.param)
    ours = import_checkpoint("llava", hf_dir, root / "minivlm")
    reference = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    return LlavaProcessor.from_pretrained(hf_dir), reference, VisionLanguageModel.from_pretrained(ours).eval()


def reference_inputs(ref_processor, batch):
    texts = [ref_processor.apply_chat_template([{**m, "content": hf_content(m["content"])} for m in messages],
                                               add_generation_prompt=True) for messages in batch]
    images = [im for messages in batch for im in images_of(messages)]
    return ref_processor(text=texts, images=images or None, return_tensors="pt", padding=True)


def test_the_image_token_keeps_its_id_and_the_template_is_llava_15(pair):
    ref_processor, reference, model = pair
    tokenizer = model.processor.tokenizer
    assert tokenizer.image_token_id == reference.config.image_token_index == model.config.image_token_id
    assert tokenizer.pad_id == ref_processor.tokenizer.pad_token_id
    text = model.processor.render_text([{"role": "user", "content": [{"type": "image", "image": image(8, 8)},
                                                                      {"type": "text", "text": "Hi"}]}],
                                       add_generation_prompt=True)
    assert text.startswith("<s>USER: <image>") and text.endswith("\nHi ASSISTANT:")


@pytest.mark.parametrize("size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_one_image_of_each_size_gives_the_reference_inputs(pair, size):
    ref_processor, _, model = pair
    messages = [{"role": "user", "content": [{"type": "image", "image": image(*size)},
                                             {"type": "text", "text": "Describe the image in detail."}]}]
    theirs = reference_inputs(ref_processor, [messages])
    ours = model.processor([messages], add_generation_prompt=True)
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])


@pytest.mark.parametrize("name", ["one image", "several images", "multi-turn"])
def test_conversations_give_the_reference_inputs_logits_and_generation(pair, name, parity):
    ref_processor, reference, model = pair
    messages = conversations([image(*s, seed=i) for i, s in enumerate(IMAGE_SIZES)])[name]
    theirs = reference_inputs(ref_processor, [messages])
    ours = model.processor([messages], add_generation_prompt=True)
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].long().tolist() == theirs["attention_mask"].tolist()
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert_same_run(parity, f"llava {name} logits", reference, theirs, model, ours, reference.config.image_token_index,
                    ref_processor.tokenizer.pad_token_id)


def test_a_padded_batch_gives_the_reference_masks(pair):
    ref_processor, _, model = pair
    convs = conversations([image(*s, seed=3 + i) for i, s in enumerate(IMAGE_SIZES)])
    batch = [convs["one image"], convs["multi-turn"]]
    theirs = reference_inputs(ref_processor, batch)
    side = ref_processor.tokenizer.padding_side
    ours = model.processor(batch, add_generation_prompt=True, padding_side=side)
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].long().tolist() == theirs["attention_mask"].tolist()
    assert 0 in theirs["attention_mask"].flatten().tolist()


def test_the_import_exports_back_to_llava_hf(pair, tmp_path, parity):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from minivlm.interop.hf_export import export_checkpoint

    _, _, model = pair
    model_dir = tmp_path / "minivlm"
    model.save_pretrained(model_dir)
    out = export_checkpoint("llava", model_dir, tmp_path / "llava-again")
    reference, ref_processor = LlavaForConditionalGeneration.from_pretrained(out).eval(), LlavaProcessor.from_pretrained(out)
    messages = conversations([image(*s, seed=9 + i) for i, s in enumerate(IMAGE_SIZES)])["several images"]
    theirs = reference_inputs(ref_processor, [messages])
    ours = model.processor([messages], add_generation_prompt=True)
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    with torch.no_grad():
        parity("llava export logits", model(ours["input_ids"], pixel_values=ours["pixel_values"]).logits,
               reference(**theirs).logits)
