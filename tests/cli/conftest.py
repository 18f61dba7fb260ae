"""A tiny checkpoint directory (with processor and retrieval head) and image files for the CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minivlm.config import preset
from minivlm.data import build_dataset
from minivlm.model import VisionLanguageModel
from minivlm.retrieval import attach_retrieval_head, load_pretrained, save_pretrained
from minivlm.train.recipe import attach_tokenizer, build_processor, build_tokenizer
from tinykit import TINY_PARTS

TINY = TINY_PARTS + (
    "decoder.n_layers=2", "decoder.max_seq_len=256", "data.max_length=256", "data.video_frames=3",
)


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """Package scope (the package-scoped checkpoint below is built on it); see tests/conftest.py."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="package")
def samples() -> list[dict]:
    """Retrieval test pairs: one image, a caption, and a captioning conversation each."""
    data = build_dataset("retrieval", "test", seed=0, image_size=48)
    return [data[i] for i in range(6)]


@pytest.fixture(scope="package")
def checkpoint(tmp_path_factory, samples) -> Path:
    """An untrained tiny model with weights drawn at a large scale (so answers depend on the input),
    a processor and a retrieval head, saved as ``minivlm train`` and ``retrieval.save_pretrained`` do."""
    train = build_dataset("shapes", "train", seed=0, image_size=48)
    tokenizer = build_tokenizer([train[i] for i in range(200)] + samples, vocab_size=300)
    cfg = attach_tokenizer(preset("tiny").override(*TINY), tokenizer)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.5)
    model.processor = build_processor(cfg, tokenizer)
    attach_retrieval_head(model)
    return save_pretrained(model, tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="package")
def model(checkpoint) -> VisionLanguageModel:
    """The checkpoint as the commands load it."""
    return load_pretrained(checkpoint).eval()


@pytest.fixture(scope="package")
def image_dir(tmp_path_factory, samples) -> Path:
    directory = tmp_path_factory.mktemp("images")
    for i, sample in enumerate(samples):
        sample["image"].save(directory / f"pair_{i}.png")
    (directory / "notes.txt").write_text("not an image\n")
    return directory
