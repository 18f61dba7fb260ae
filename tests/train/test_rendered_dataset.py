"""Rendering for training: a grouped item's shared image is preprocessed once for all its questions,
and the batch is exactly the one that rendering every question on its own gives."""

from __future__ import annotations

import pytest
import torch
import trainkit as tk

from minivlm.data import build_dataset
from minivlm.train.data import RenderedDataset, RenderedGroup, TrainCollator


class CountingImageProcessor:
    """Wraps an image processor and counts its calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.config = inner.config

    def __call__(self, image):
        self.calls += 1
        return self.inner(image)


@pytest.fixture()
def groups():
    data = build_dataset("easy_vqa_grouped", "train", seed=0, image_size=tk.IMAGE_SIZE)
    return tk.ListDataset([data[i] for i in range(4)])


@pytest.mark.parametrize("pack_length", [None, 256], ids=["padded", "packed"])
def test_render_once_gives_the_batch_of_rendering_each_question_alone(groups, pack_length, monkeypatch):
    processor = tk.processor()
    counting = CountingImageProcessor(processor.image_processor)
    monkeypatch.setattr(processor, "image_processor", counting)
    rendered = RenderedDataset(groups, processor)
    items = [rendered[i] for i in range(len(groups))]
    assert counting.calls == len(groups)  # one image preprocessing per group, not per question

    counting.calls = 0
    alone = [RenderedGroup([processor.render(s["messages"], for_training=True) for s in group], [])
             for group in groups]
    assert counting.calls == sum(len(group) for group in groups)

    collate = TrainCollator(processor.tokenizer.pad_id, pack_length, processor.tokenizer.image_token_id, "square")
    once, each = collate(items), collate(alone)
    assert once.keys() == each.keys()
    for key, value in once.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, each[key]), key
        else:
            assert value == each[key], key


def test_a_generation_batch_preprocesses_each_shared_image_once(groups, monkeypatch):
    """Evaluation batches hold many questions about the same image objects: the processor call
    preprocesses each once, and the batch equals the concatenation of each prompt rendered alone."""
    processor = tk.processor()
    counting = CountingImageProcessor(processor.image_processor)
    monkeypatch.setattr(processor, "image_processor", counting)
    prompts = [[s["messages"][0]] for group in groups for s in group]
    batch = processor(prompts, add_generation_prompt=True, padding_side="left")
    assert counting.calls == len(groups)
    alone = torch.cat([processor.render(p, add_generation_prompt=True).pixel_values for p in prompts])
    assert torch.equal(batch["pixel_values"], alone)
    assert batch["input_ids"].shape[0] == len(prompts) > len(groups)
