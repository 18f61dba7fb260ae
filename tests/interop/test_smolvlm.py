"""SmolVLM / Idefics3 checkpoints through `minivlm import smolvlm`: inputs, logits and greedy
generation equal transformers' ``Idefics3Processor`` + ``Idefics3ForConditionalGeneration``.

Two configurations differ in tile size, patch grid, pixel-shuffle factor and head tying; the
second has a 25x25 patch grid, where transformers' bucketised patch positions differ from the
row-major grid (``encoder.pos_index=idefics3``), and a tile that is not a multiple of the patch
(``encoder.drop_remainder``), as SmolVLM-Instruct's 384 px tiles with 14 px patches.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from paritykit import IMAGE_SIZES, assert_same_run, conversations, hf_content, image, images_of, real_views

transformers = pytest.importorskip("transformers")

from minivlm.interop.convert import import_checkpoint  # noqa: E402
from minivlm.interop.reference import save_smolvlm  # noqa: E402
from minivlm.model import VisionLanguageModel  # noqa: E402
from minivlm.text.processor import Processor  # noqa: E402
from minivlm.vision.idefics3 import Idefics3ImageProcessor  # noqa: E402

CONFIGS = {
    "tile32-shuffle2": dict(image_size=32, patch_size=8, scale_factor=2, longest_edge=96, seed=1),
    # As SmolVLM-Instruct's 384 px / 14 px patches, the tile is not a multiple of the patch (76 = 25 x 3 + 1).
    "tile76-grid25-shuffle5": dict(image_size=76, patch_size=3, scale_factor=5, longest_edge=152,
                                   tie_embeddings=True, width=24, seed=2),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(reference processor, reference model, imported minivlm model) for one configuration."""
    from transformers import Idefics3ForConditionalGeneration, Idefics3Processor

    root = tmp_path_factory.mktemp(request.param)
    hf_dir = save_smolvlm(root / "hf", **CONFIGS[request.param])
    ours = import_checkpoint("smolvlm", hf_dir, root / "minivlm")
    reference = Idefics3ForConditionalGeneration.from_pretrained(hf_dir).eval()
    return Idefics3Processor.from_pretrained(hf_dir), reference, VisionLanguageModel.from_pretrained(ours).eval()


def unsplit(processor: Processor) -> Processor:
    config = dataclasses.replace(processor.image_processor.config, split_image=False)
    return Processor(processor.tokenizer, Idefics3ImageProcessor(config), processor.image_seq_len,
                     template=processor.template)


def reference_inputs(ref_processor, batch: list[list[dict]], **kwargs):
    texts = [ref_processor.apply_chat_template([{**m, "content": hf_content(m["content"])} for m in messages],
                                               add_generation_prompt=True) for messages in batch]
    return ref_processor(text=texts, images=[images_of(m) for m in batch], return_tensors="pt", padding=True, **kwargs)


def assert_same_inputs(ours: dict, theirs, batch: list[list[dict]]) -> None:
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].long().tolist() == theirs["attention_mask"].tolist()
    counts = [int(n) for n in (theirs["pixel_values"].flatten(2).abs().sum(-1) > 0).sum(1)]
    assert torch.equal(ours["pixel_values"], real_views(theirs["pixel_values"], counts))


@pytest.mark.parametrize("split", [True, False], ids=["split", "unsplit"])
@pytest.mark.parametrize("size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_one_image_of_each_size_gives_the_reference_inputs(pair, size, split):
    ref_processor, _, model = pair
    processor = model.processor if split else unsplit(model.processor)
    messages = [{"role": "user", "content": [{"type": "image", "image": image(*size)},
                                             {"type": "text", "text": "Describe the image in detail."}]}]
    theirs = reference_inputs(ref_processor, [messages], do_image_splitting=split)
    assert_same_inputs(processor([messages], add_generation_prompt=True), theirs, [messages])


@pytest.mark.parametrize("name", ["one image", "several images", "multi-turn"])
def test_conversations_give_the_reference_inputs_logits_and_generation(pair, name, parity):
    ref_processor, reference, model = pair
    messages = conversations([image(*s, seed=i) for i, s in enumerate(IMAGE_SIZES)])[name]
    theirs = reference_inputs(ref_processor, [messages])
    ours = model.processor([messages], add_generation_prompt=True)
    assert_same_inputs(ours, theirs, [messages])
    assert_same_run(parity, f"smolvlm {name} logits", reference, theirs, model, ours, reference.config.image_token_id,
                    ref_processor.tokenizer.pad_token_id)


def test_a_padded_batch_gives_the_reference_inputs_and_masks(pair):
    ref_processor, _, model = pair
    convs = conversations([image(*s, seed=7 + i) for i, s in enumerate(IMAGE_SIZES)])
    batch = [convs["one image"], convs["multi-turn"]]
    theirs = reference_inputs(ref_processor, batch)
    assert_same_inputs(model.processor(batch, add_generation_prompt=True), theirs, batch)
    assert 0 in theirs["attention_mask"].flatten().tolist()  # the batch really was padded


def test_a_smolvlm2_checkpoint_imports_with_the_same_inputs_and_logits(tmp_path, parity):
    pytest.importorskip("num2words")  # SmolVLMProcessor needs it
    from transformers import AutoProcessor, SmolVLMForConditionalGeneration

    hf_dir = save_smolvlm(tmp_path / "hf", smolvlm2=True, seed=4)
    model = VisionLanguageModel.from_pretrained(import_checkpoint("smolvlm", hf_dir, tmp_path / "minivlm")).eval()
    ref_processor = AutoProcessor.from_pretrained(hf_dir)
    reference = SmolVLMForConditionalGeneration.from_pretrained(hf_dir).eval()
    assert type(ref_processor).__name__ == "SmolVLMProcessor" and model.processor.template.kind == "idefics3"
    messages = conversations([image(*s, seed=i) for i, s in enumerate(IMAGE_SIZES)])["multi-turn"]
    theirs = reference_inputs(ref_processor, [messages])
    ours = model.processor([messages], add_generation_prompt=True)
    assert_same_inputs(ours, theirs, [messages])
    assert_same_run(parity, "smolvlm2 multi-turn logits", reference, theirs, model, ours,
                    reference.config.image_token_id, ref_processor.tokenizer.pad_token_id)
