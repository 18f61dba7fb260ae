"""``minivlm.build``: a preset becomes a model and the processor that feeds it."""

from __future__ import annotations

import torch
from PIL import Image

import minivlm
from minivlm.data import vqa_sample
from minivlm.data.sample import image_item


def test_a_preset_builds_with_a_processor_whose_vocabulary_the_model_shares():
    torch.set_num_threads(1)
    model, processor = minivlm.build("tiny", "fusion=prefix", corpus_samples=200)
    assert model.processor is processor and model.config.fusion.kind == "prefix"
    assert model.config.decoder.vocab_size == processor.tokenizer.vocab_size
    assert model.config.image_token_id == processor.tokenizer.image_token_id
    conversation = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (40, 30), "blue")},
                                                 {"type": "text", "text": "Describe the image."}]},
                    {"role": "assistant", "content": "a blue circle"}]
    batch = processor([conversation, conversation])
    assert batch["pixel_values"].shape[1] == 3 * model.config.encoder.temporal_patch_size
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and (batch["labels"] != -100).sum() > 0


def test_a_given_corpus_and_config_are_used():
    words = ["zebra", "quokka", "axolotl"]
    corpus = [vqa_sample(visuals=[image_item(Image.new("RGB", (8, 8)))], question=f"Is it a {w}?", answer=w,
                         task="t", sample_id=str(i)) for i, w in enumerate(words * 20)]
    config = minivlm.preset("tiny")
    model, processor = minivlm.build(config, "decoder.n_layers=1", corpus=corpus, corpus_samples=60)
    assert model.config.decoder.n_layers == 1 and config.decoder.n_layers != 1  # the given config is not changed
    assert len(processor.tokenizer.encode("quokka")) < len(processor.tokenizer.encode("xqvjzw"))  # learnt from it
