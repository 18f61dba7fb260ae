"""Shared fixtures-as-functions for the trainer tests: a tiny model, data and tokenizer.

Imported by the test modules of this folder (and by the worker processes of the distributed
tests, which is why these are plain functions and not pytest fixtures).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch.utils.data import Dataset

from minivlm.config import VLMConfig, preset
from minivlm.data import build_dataset
from minivlm.model import VisionLanguageModel
from minivlm.text.processor import Processor
from minivlm.text.tokenizer import Tokenizer
from minivlm.train.distributed import DistributedContext
from minivlm.train.recipe import attach_tokenizer, build_processor, build_tokenizer

IMAGE_SIZE = 48  # the smallest size the procedural datasets render legibly

#: encoder 48 px / 12 px patches = 4x4 grid, pixel shuffle 2 -> 4 image tokens; one layer each.
TINY_OVERRIDES = (
    f"encoder.image_size={IMAGE_SIZE}", "encoder.patch_size=12", "encoder.stem=patch", "encoder.width=32", "encoder.depth=1",
    "encoder.n_heads=2", "encoder.mlp_dim=64",
    "decoder.width=32", "decoder.n_layers=1", "decoder.n_heads=2", "decoder.n_kv_heads=1", "decoder.mlp_dim=64",
    "decoder.max_seq_len=128", "data.max_length=64",
    "data.packing=false", "data.curriculum=", "data.curriculum_steps=0",  # plain batches, one dataset
    "train.precision=fp32", "train.lr=3e-3", "train.warmup_steps=2", "train.batch_size=4", "train.steps=6",
    "train.save_every=0", "train.log_every=1", "train.max_nonfinite=3",
    "train.loss_weighting=token",  # the reference losses of these tests are plain token means
    "train.cpu_threads=1",  # a fixed thread count: float results depend on it (bitwise resume tests)
    "train.retrieval_weight=0",  # generation only (tests/train/test_contrastive.py turns it on)
)


class ListDataset(Dataset):
    """A fixed list of chat samples."""

    def __init__(self, samples: list[dict[str, Any]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples[index]


@functools.lru_cache(maxsize=None)
def shapes_samples(n: int = 64) -> tuple[dict[str, Any], ...]:
    data = build_dataset("shapes", "train", seed=0, image_size=IMAGE_SIZE)
    return tuple(data[i] for i in range(n))


def dataset(n: int = 64) -> ListDataset:
    return ListDataset(list(shapes_samples(n)))


@functools.lru_cache(maxsize=None)
def _base() -> tuple[VLMConfig, Tokenizer, Processor]:
    cfg = preset("tiny").override(*TINY_OVERRIDES)
    tokenizer = build_tokenizer(ListDataset(list(shapes_samples(256))), vocab_size=300)
    attach_tokenizer(cfg, tokenizer)
    return cfg, tokenizer, build_processor(cfg, tokenizer)


def config(*overrides: str) -> VLMConfig:
    """The tiny config with dotted overrides, e.g. ``config("train.grad_accum=2")``."""
    return copy.deepcopy(_base()[0]).override(*overrides)


def processor(cfg: VLMConfig | None = None) -> Processor:
    """The processor of ``cfg`` (placeholders per image follow its projector and fusion)."""
    base_cfg, tokenizer, base_processor = _base()
    return base_processor if cfg is None else build_processor(cfg, tokenizer)


def model(cfg: VLMConfig, seed: int = 0) -> VisionLanguageModel:
    """A freshly initialised model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return VisionLanguageModel(copy.deepcopy(cfg))


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Model inputs for ``samples``, padded (as the trainer's collator builds them)."""
    proc = processor()
    batch = proc([s["messages"] for s in samples])
    return {k: v for k, v in batch.items() if v is not None}


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def too_long_sample() -> dict[str, Any]:
    """A sample whose prompt alone exceeds ``data.max_length``: the processor skips it."""
    return {"messages": [{"role": "user", "content": "word " * 80 + "what?"},
                         {"role": "assistant", "content": "red"}]}


def text_sample(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def with_skipped_micro_batch(samples: list[dict[str, Any]], indices: list[int]) -> ListDataset:
    """``samples`` with the dataset ``indices`` (one micro-batch's) replaced by unrenderable ones."""
    data = list(samples)
    for index in indices:
        data[index] = too_long_sample()
    return ListDataset(data)


class SimulatedCrash(Exception):
    """Stands for a process killed right after a checkpoint was written."""


def crash_after_checkpoint(trainer, step: int) -> None:
    """Make ``trainer.fit`` raise :class:`SimulatedCrash` once the checkpoint of ``step`` is on disk."""
    save = trainer.save

    def save_then_crash():
        path = save()
        if trainer.step == step:
            raise SimulatedCrash(f"killed after saving step {step}")
        return path

    trainer.save = save_then_crash


def cpu() -> DistributedContext:
    """A single-process CPU context: the tests stay on the CPU (fp32-exact) on a GPU machine too."""
    return DistributedContext.single("cpu")
