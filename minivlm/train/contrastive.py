"""A contrastive image-text objective trained beside generation (``train.retrieval_weight``).

Each optimizer step, besides its generation batch, draws ``train.retrieval_batch_size``
image-caption pairs from ``train.retrieval_data`` and adds ``retrieval_weight`` times their
CLIP (InfoNCE) or SigLIP (sigmoid) loss to the step's loss; the model's retrieval head
(:mod:`minivlm.retrieval_head`) projects the encoder's pooled image and the decoder's mean caption
state into one space (:mod:`minivlm.retrieval`). One model then both answers and retrieves, as in
CoCa (Yu et al. 2022) and BLIP (Li et al. 2022), which train contrastive and captioning losses
together.

The pairs of a step are a pure function of ``(train.seed, step)``, so a resumed run draws exactly
the pairs it would have drawn. Single process only: the objective calls the encoder and decoder
outside the distributed wrapper's forward, which DDP's gradient hooks and FSDP's sharded
parameters do not allow.
"""

from __future__ import annotations

import random
from typing import Any

from torch import Tensor

from minivlm.config import ConfigError, TrainConfig
from minivlm.data import build_dataset
from minivlm.retrieval import contrastive_loss, image_and_caption, preprocess_images, tokenize_texts
from minivlm.retrieval_head import LOSSES, RetrievalConfig


def check_contrastive_config(cfg: TrainConfig, world_size: int = 1) -> None:
    """Reject ``train.retrieval_*`` settings the objective cannot run with (``ConfigError``)."""
    weight = cfg.retrieval_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise ConfigError(f"train.retrieval_weight: expected a finite number >= 0 (0: off), got {weight!r}")
    size = cfg.retrieval_batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ConfigError(f"train.retrieval_batch_size: expected an integer >= 2 (a contrastive batch needs "
                          f"negatives), got {size!r}")
    if cfg.retrieval_loss not in LOSSES:
        raise ConfigError(f"train.retrieval_loss: expected one of {', '.join(LOSSES)}, got {cfg.retrieval_loss!r}")
    if weight and world_size > 1:
        raise ConfigError(f"train.retrieval_weight={weight}: the contrastive objective trains in one process only "
                          f"(got {world_size} ranks); set train.retrieval_weight=0 for distributed runs")


class ContrastiveObjective:
    """The pairs and the loss of the contrastive objective.

    Args:
        pairs: map-style dataset whose samples carry ``"image"`` and ``"caption"``.
        processor: the model's processor (image preprocessing and the tokenizer).
        batch_size: pairs per step (``B``: the loss contrasts each with the other ``B - 1``).
        seed: with the step number, decides the pairs of each step.
    """

    def __init__(self, pairs, processor, batch_size: int, seed: int):
        if len(pairs) < batch_size:
            raise ConfigError(f"train.retrieval_data has {len(pairs)} image-caption pairs, fewer than "
                              f"train.retrieval_batch_size={batch_size}")
        if not {"image", "caption"} <= set(pairs[0]):
            raise ConfigError(f"train.retrieval_data: samples need 'image' and 'caption' fields (image-caption "
                              f"pairs, e.g. the 'retrieval' dataset); the first has {sorted(pairs[0])}")
        self.pairs, self.processor, self.batch_size, self.seed = pairs, processor, batch_size, seed

    @classmethod
    def from_config(cls, cfg: TrainConfig, processor, image_size: int) -> ContrastiveObjective:
        pairs = build_dataset(cfg.retrieval_data, "train", seed=cfg.seed, image_size=image_size)
        return cls(pairs, processor, cfg.retrieval_batch_size, cfg.seed)

    @staticmethod
    def head_config(cfg: TrainConfig) -> RetrievalConfig:
        return RetrievalConfig(loss=cfg.retrieval_loss)

    def indices(self, step: int) -> list[int]:
        """The ``batch_size`` distinct pair indices of ``step`` (0-based)."""
        # A string seed: random.Random hashes it with SHA-512, the same on every run and platform.
        return random.Random(f"contrastive/{self.seed}/{step}").sample(range(len(self.pairs)), self.batch_size)

    def batch(self, step: int) -> dict[str, Any]:
        """``pixel_values`` [B, C, H, W] and the captions' ``input_ids`` / ``attention_mask`` [B, T]."""
        images, captions = zip(*(image_and_caption(self.pairs[i]) for i in self.indices(step)))
        input_ids, attention_mask = tokenize_texts(self.processor, captions)
        return {"pixel_values": preprocess_images(self.processor, images), "input_ids": input_ids,
                "attention_mask": attention_mask}

    def loss(self, model, step: int) -> Tensor:
        """The head's contrastive loss on the pairs of ``step`` (a scalar on the model's device)."""
        batch = {k: v.to(model.device) for k, v in self.batch(step).items()}
        return contrastive_loss(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
