"""Cross-modal retrieval with the VLM's own towers and a contrastive objective.

Embeddings (both L2-normalised, in a shared width ``RetrievalConfig.dim``)::

    image:  RetrievalHead.image_proj( encoder.pooled(pixels) )                     [N, E]
    text:   RetrievalHead.text_proj( masked mean over the caption's real tokens
                                     of the decoder's final hidden states )       [N, E]

The image side is CLIP's image tower (Radford et al. 2021): the encoder's pooled output and a
linear projection. The text side reuses the decoder as the text tower, mean-pooled over the
caption tokens as in sentence encoders built on language models (SGPT, Muennighoff 2022), so
retrieval needs no second text model and can be trained alone or alongside generation.

Objectives, both with learnable temperature:

* ``"clip"``: the symmetric InfoNCE loss of CLIP (van den Oord et al. 2018; Radford et al. 2021):
  cross-entropy over each row and each column of the ``B x B`` similarity matrix scaled by
  ``exp(t)``, ``t`` initialised to ``log(1 / 0.07)`` and capped at ``log(100)``.
* ``"siglip"``: the sigmoid loss of SigLIP (Zhai et al. 2023): every pair is a binary decision,
  ``-sum_ij log sigmoid(z_ij (exp(t) * sim_ij + b)) / B`` with ``z = 1`` on matching pairs and
  ``-1`` elsewhere; ``t = log 10`` and ``b = -10`` at initialisation (their eq. 1 and sec. 3).

The projections and temperature live in a :class:`~minivlm.retrieval_head.RetrievalHead`, the
model's declared optional submodule ``model.retrieval_head`` (added by :func:`attach_retrieval_head`),
so optimisers, ``.to()`` and distributed wrappers see it with the rest of the model, and the
model's own ``save_pretrained`` / ``from_pretrained`` write and read it beside the weights
(``retrieval_head.json`` + ``retrieval_head.safetensors``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from minivlm.model import VisionLanguageModel
from minivlm.retrieval_head import (
    HEAD_CONFIG_NAME,
    HEAD_WEIGHTS_NAME,
    RetrievalConfig,
    RetrievalHead,
    clip_loss,
    siglip_loss,
)

log = logging.getLogger(__name__)

# ---- the head on the model ----------------------------------------------------------------------------
def attach_retrieval_head(model: VisionLanguageModel, config: RetrievalConfig | None = None) -> RetrievalHead:
    """Give ``model`` a new head (on its device and dtype): :meth:`VisionLanguageModel.add_retrieval_head`."""
    return model.add_retrieval_head(config)


def retrieval_head_of(model: VisionLanguageModel) -> RetrievalHead:
    head = getattr(model, "retrieval_head", None)
    if not isinstance(head, RetrievalHead):
        raise ValueError("this model has no retrieval head: attach one with attach_retrieval_head(model) and "
                         "train it (train_retrieval), or load a checkpoint saved with one")
    return head


def save_pretrained(model: VisionLanguageModel, directory: str | Path) -> Path:
    """``model.save_pretrained(directory)``: the head, if any, is saved with the model, in its own files
    beside the weights (written in the same atomic directory replacement)."""
    return model.save_pretrained(directory)


def load_pretrained(directory: str | Path, map_location: str | torch.device = "cpu") -> VisionLanguageModel:
    """``VisionLanguageModel.from_pretrained``: the head saved beside the weights, if any, comes with it."""
    return VisionLanguageModel.from_pretrained(directory, map_location=map_location)


# ---- embeddings -------------------------------------------------------------------------------------
def image_embeddings(model: VisionLanguageModel, pixel_values: Tensor) -> Tensor:
    """``[N, C, H, W]`` preprocessed images -> ``[N, E]`` unit-norm embeddings (differentiable)."""
    head = retrieval_head_of(model)
    pooled = model.encoder.pooled(pixel_values.to(device=model.device, dtype=model.encoder.pos_embed.dtype))
    return head.embed_image_features(pooled)


def text_embeddings(model: VisionLanguageModel, input_ids: Tensor, attention_mask: Tensor,
                    validate: bool = True) -> Tensor:
    """``[N, T]`` right-padded caption ids and mask -> ``[N, E]`` unit-norm embeddings (differentiable).

    The decoder is causal, so right padding never reaches a real token's state; the mean runs
    over real tokens only. ``validate=False`` skips the model's id checks (host syncs) for ids
    that come from the tokenizer (:func:`tokenize_texts`).
    """
    head = retrieval_head_of(model)
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    hidden = model(input_ids, attention_mask=attention_mask, return_logits=False, validate=validate).hidden  # [N, T, D]
    weights = attention_mask.to(hidden.dtype)[..., None]
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)
    return head.embed_text_features(pooled)


def tokenize_texts(processor, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Right-padded ``input_ids, attention_mask [N, T]`` of plain texts (no chat template)."""
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty sequence of strings")
    encoded = [processor.tokenizer.encode(t) for t in texts]
    empty = [t for t, ids in zip(texts, encoded) if not ids]
    if empty:
        raise ValueError(f"texts {empty[:3]} encode to no tokens; every text needs at least one")
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), processor.tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.bool)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = True
    return ids, mask


def preprocess_images(processor, images: Sequence[Any]) -> Tensor:
    """``[N, C, H, W]`` encoder inputs: one global view per image (tiles are not used for retrieval);
    ``C = 3 * temporal_patch_size`` (an image is a still clip, :meth:`Processor.as_stills`).

    ``images``: anything :func:`minivlm.vision.load_image` reads; an unreadable one raises
    :class:`~minivlm.vision.ImageLoadError` naming it.
    """
    if isinstance(images, (str, Path)) or not images:
        raise ValueError("images must be a non-empty sequence of images or paths")
    return processor.as_stills(torch.stack([processor.image_processor(image).pixel_values[-1] for image in images]))


def _processor(model: VisionLanguageModel):
    from minivlm.generate import processor_of

    return processor_of(model)


@torch.no_grad()
def embed_images(model: VisionLanguageModel, images: Sequence[Any], batch_size: int = 64) -> Tensor:
    """Unit-norm embeddings ``[N, E]`` (float32, CPU) of images or image paths."""
    processor = _processor(model)
    pixels = preprocess_images(processor, images)
    return torch.cat([image_embeddings(model, pixels[i : i + batch_size]).float().cpu()
                      for i in range(0, len(pixels), batch_size)])


@torch.no_grad()
def embed_texts(model: VisionLanguageModel, texts: Sequence[str], batch_size: int = 64) -> Tensor:
    """Unit-norm embeddings ``[N, E]`` (float32, CPU) of plain texts."""
    processor = _processor(model)
    chunks = []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenize_texts(processor, texts[start : start + batch_size])
        chunks.append(text_embeddings(model, ids, mask).float().cpu())
    if not chunks:
        raise ValueError("texts must be a non-empty sequence of strings")
    return torch.cat(chunks)


def rank(queries: Tensor, items: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` items most similar to each query (cosine similarity), best first.

    Args:
        queries: ``[E]`` or ``[Q, E]``; items: ``[N, E]``.
        k: how many to return (None: all ``N``).

    Returns:
        ``(indices, scores)``, each ``[k]`` for one query or ``[Q, k]``.
    """
    single = queries.ndim == 1
    queries = queries[None] if single else queries
    if queries.ndim != 2 or items.ndim != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"expected queries [Q, E] and items [N, E] of one width E, got {list(queries.shape)} "
                         f"and {list(items.shape)}")
    k = items.shape[0] if k is None else k
    if not 1 <= k <= items.shape[0]:
        raise ValueError(f"k must lie in [1, {items.shape[0]}] (the number of items), got {k}")
    similarity = F.normalize(queries.float(), dim=-1) @ F.normalize(items.float(), dim=-1).T
    scores, indices = similarity.topk(k, dim=-1)
    return (indices[0], scores[0]) if single else (indices, scores)


# ---- training and evaluation --------------------------------------------------------------------------
def contrastive_loss(model: VisionLanguageModel, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The head's contrastive loss over a batch of ``B`` matching (image, caption) pairs, whose
    caption ids come from :func:`tokenize_texts` (so the training step skips the id checks)."""
    head = retrieval_head_of(model)
    return head.loss(image_embeddings(model, pixel_values),
                     text_embeddings(model, input_ids, attention_mask, validate=False))


def image_and_caption(sample: dict[str, Any]) -> tuple[Any, str]:
    """The image and caption of a retrieval sample (``"image"`` / ``"caption"`` keys, as
    :class:`~minivlm.data.RetrievalDataset` yields)."""
    if "image" not in sample or "caption" not in sample:
        raise ValueError(f"sample {sample.get('id')!r} has no 'image' and 'caption'; retrieval needs image-caption "
                         f"pairs (e.g. the 'retrieval' dataset)")
    return sample["image"], sample["caption"]


@dataclass
class RetrievalTrainResult:
    """Per-step losses of :func:`train_retrieval` (``generation`` is empty when not trained)."""

    contrastive: list[float]
    generation: list[float]


def train_retrieval(model: VisionLanguageModel, dataset, steps: int, *, batch_size: int = 32, lr: float = 1e-3,
                    weight_decay: float = 0.01, generation_weight: float = 0.0, config: RetrievalConfig | None = None,
                    seed: int = 0) -> RetrievalTrainResult:
    """A small AdamW loop on the contrastive loss, optionally plus captioning (``generation_weight``).

    Attaches a head (``config``) when the model has none; a different ``config`` for an
    attached head is an error. Each step draws ``batch_size``
    distinct samples; with ``generation_weight > 0`` the loss adds that multiple of the
    language-model loss on the samples' conversations, so one model learns to retrieve and to
    describe at once. Every trainable parameter of the model and head is updated.

    Args:
        dataset: items with ``"image"`` and ``"caption"`` (and ``"messages"`` for generation).
        steps, batch_size, lr, weight_decay: the optimisation (constant learning rate).
        seed: the batch order.
    """
    if steps < 1 or batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2 (a contrastive batch needs negatives); "
                         f"got steps={steps}, batch_size={batch_size}")
    if not generation_weight >= 0:
        raise ValueError(f"generation_weight must be >= 0, got {generation_weight}")
    if len(dataset) < batch_size:
        raise ValueError(f"the dataset has {len(dataset)} samples, fewer than batch_size={batch_size}")
    head = getattr(model, "retrieval_head", None)
    if head is None:
        attach_retrieval_head(model, config)
    elif config is not None and config != head.config:
        raise ValueError(f"the model already has a retrieval head with {head.config}; got config={config}")
    processor = _processor(model)
    # Matrices decay; gains, biases and the temperature do not (CLIP and GPT-2 practice).
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)
    rng = random.Random(seed)
    result = RetrievalTrainResult([], [])
    was_training = model.training
    model.train()
    for step in range(steps):
        samples = [dataset[i] for i in rng.sample(range(len(dataset)), batch_size)]
        images, captions = zip(*(image_and_caption(s) for s in samples))
        ids, mask = tokenize_texts(processor, captions)
        loss = contrastive_loss(model, preprocess_images(processor, images), ids, mask)
        result.contrastive.append(loss.item())
        if generation_weight > 0:
            batch = processor([s["messages"] for s in samples])
            pixels = batch["pixel_values"]
            generation = model(batch["input_ids"].to(model.device),
                               pixel_values=None if pixels is None else pixels.to(model.device),
                               labels=batch["labels"].to(model.device),
                               attention_mask=batch["attention_mask"].to(model.device), return_logits=False).loss
            result.generation.append(generation.item())
            loss = loss + generation_weight * generation
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("retrieval step %d/%d: contrastive loss %.4f", step + 1, steps, result.contrastive[-1])
    model.train(was_training)
    return result


__all__ = [
    "HEAD_CONFIG_NAME",
    "HEAD_WEIGHTS_NAME",
    "RetrievalConfig",
    "RetrievalHead",
    "RetrievalTrainResult",
    "attach_retrieval_head",
    "clip_loss",
    "contrastive_loss",
    "embed_images",
    "embed_texts",
    "image_embeddings",
    "load_pretrained",
    "rank",
    "retrieval_head_of",
    "save_pretrained",
    "siglip_loss",
    "text_embeddings",
    "train_retrieval",
]
