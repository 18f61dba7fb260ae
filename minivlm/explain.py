"""Attention maps: where the decoder looked while answering, and the encoder's attention rollout.

Two views of one question about one image:

* **decoder attention**: the attention probabilities of the queries that produced the answer
  tokens, onto the image tokens, averaged over heads, layers and answer tokens, then mapped back
  to the encoder's patch grid through the projector (see :func:`tokens_to_patches`). With token
  splice / prefix fusion these are the decoder's self-attention weights on the image positions;
  with cross-attention fusion they are the gated cross-attention weights. A plain average
  (rather than a rollout through the decoder) is used because the decoder's residual stream
  mixes text positions with image positions: rolling out would spread the map over the prompt.
* **encoder rollout** (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"):
  per block, average the heads, add the identity for the residual connection, renormalise rows,
  and multiply through the blocks that produce the projector's features. The map is the class
  token's row when the encoder has one, otherwise the mean over patch rows (how much, on average,
  the output patches draw from each input patch).
* **answer -> pixels**: the decoder map (over the encoder's output patches) pushed through the
  rollout to the input patches, i.e. attention flow from the answer to the pixels. After a few
  encoder blocks every output patch carries information from elsewhere, so a decoder that
  attends evenly to all image tokens can still be reading the shape: this map shows where from.

Probabilities are captured without touching model code: :func:`record_attention` routes every
attention call through an fp32 reference that keeps its probabilities, and names each record by
the module that made the call (``decoder.layers.2.attn``, ``encoder.blocks.0.attn``,
``projector.layers.1``, ``fusion.blocks.0``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from minivlm.kernels.dispatch import override_backend
from minivlm.kernels.mask import AttentionMask
from minivlm.kernels.reference import math_attention
from minivlm.model import IGNORE_INDEX
from minivlm.registry import FUSIONS, PROJECTORS

log = logging.getLogger(__name__)

_ENCODER_BLOCK = re.compile(r"^encoder\.blocks\.\d+\.")
_DECODER_LAYER = re.compile(r"^decoder\.layers\.\d+\.")
_PROJECTOR = re.compile(r"^projector\.")
_FUSION = re.compile(r"^fusion\.")


class ExplainError(ValueError):
    """The model or input cannot be explained (several image views, an unknown projector...)."""


# ---- capturing attention probabilities ---------------------------------------------------------


@dataclass
class AttentionRecord:
    """One attention call: ``module`` is the qualified name of the calling module, ``probs``
    its ``[B, H, T, S]`` weights (fp32, CPU)."""

    module: str
    probs: Tensor


@dataclass
class AttentionRecorder:
    """The records of every attention call made inside :func:`record_attention`, in call order."""

    records: list[AttentionRecord] = field(default_factory=list)

    def matching(self, pattern: re.Pattern[str]) -> list[Tensor]:
        """Probabilities of the calls whose module name matches ``pattern``, in call order."""
        return [r.probs for r in self.records if pattern.search(r.module)]


@contextmanager
def record_attention(model: nn.Module) -> Iterator[AttentionRecorder]:
    """Record the probabilities of every attention call ``model`` makes inside the block.

    Every attention call inside the block is routed to an fp32 reference that keeps its
    probabilities (:func:`~minivlm.kernels.dispatch.override_backend`: whatever backend a module
    chose), and forward hooks keep a stack of the module names being executed so each record is
    named by its caller. Everything is restored on exit, also when the block raises.

    Example::

        with torch.no_grad(), record_attention(model) as recorder:
            model(input_ids, pixel_values=pixels)
        encoder_probs = recorder.matching(re.compile(r"^encoder\\.blocks"))
    """
    recorder = AttentionRecorder()
    running: list[str] = []

    def keep(probs: Tensor) -> None:
        recorder.records.append(AttentionRecord(running[-1] if running else "", probs.detach().cpu()))

    def recording_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float | None = None) -> Tensor:
        return math_attention(q, k, v, mask, scale, weights_hook=keep)

    def entering(name: str):
        def hook(_module: nn.Module, _args: Any) -> None:
            running.append(name)

        return hook

    def leaving(_module: nn.Module, _args: Any, _output: Any) -> None:
        running.pop()  # hooks must return None: a returned value would replace the module's output

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(entering(name)))
        handles.append(module.register_forward_hook(leaving))
    try:
        with override_backend(recording_attention):
            yield recorder
    finally:
        for handle in handles:
            handle.remove()


# ---- rollout and token -> patch mapping -----------------------------------------------------


def attention_rollout(layers: Sequence[Tensor]) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) through blocks given in forward order.

    Args:
        layers: one ``[H, L, L]`` probability tensor per block.
    Returns:
        ``[L, L]``: row ``i`` is how much output token ``i`` draws from each input token; rows
        sum to 1. Each block contributes ``0.5 * mean_heads(A) + 0.5 * I`` (the residual
        connection), renormalised.
    """
    if not layers:
        raise ExplainError("attention_rollout needs at least one block's attention; got none")
    L = layers[0].shape[-1]
    rollout = torch.eye(L, dtype=torch.float64)
    for i, probs in enumerate(layers):
        if probs.ndim != 3 or probs.shape[1:] != (L, L):
            raise ExplainError(f"block {i}: expected attention of shape [H, {L}, {L}], got {list(probs.shape)}")
        mixed = 0.5 * probs.double().mean(0) + 0.5 * torch.eye(L, dtype=torch.float64)
        rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
    return rollout.float()


def tokens_to_patches(token_weights: Tensor, config, resampler_attention: Sequence[Tensor] = ()) -> Tensor:
    """Map weights over one image's projector tokens ``[P']`` to its patch grid ``[g, g]``.

    Each projector declares the mapping (``patch_weights``, the part contract of
    :mod:`minivlm.registry`); mass is conserved. ``linear`` / ``mlp``: token ``i`` is patch ``i``;
    ``pixel_shuffle``: a token shares its weight equally over its ``r x r`` patch block;
    ``resampler``: a latent's weight spreads over the patches as its recorded attention onto them
    did (``resampler_attention``: the projector's own recorded attention, per layer ``[H, L, P + L]``).

    Raises:
        ExplainError: the projector declares no mapping, or the weights do not fit it.
    """
    e, kind = config.encoder, config.projector.kind
    projector = PROJECTORS.get(kind)
    if not hasattr(projector, "patch_weights"):
        raise ExplainError(f"projector {kind!r} declares no patch_weights (minivlm.registry): its image tokens "
                           f"cannot be mapped back to the {e.n_patches} patches")
    try:
        weights = projector.patch_weights(token_weights.double(), config, resampler_attention)
    except ValueError as error:
        raise ExplainError(str(error)) from None
    return weights.view(e.grid_size, e.grid_size).float()


def _normalised(x: Tensor) -> np.ndarray:
    total = float(x.sum())
    return (x / total if total > 0 else torch.full_like(x, 1.0 / x.numel())).numpy()


# ---- the explanation ---------------------------------------------------------------------------


@dataclass
class Explanation:
    """Attention maps for one answer.

    Attributes:
        image: ``[H, W, 3]`` float in [0, 1], the image as the encoder saw it (resized/letterboxed).
        question, answer: the text; ``answer`` is the model's greedy reply unless one was given.
        decoder_map: ``[g, g]`` patch grid, sums to 1: the answer's attention on the image.
        encoder_map: ``[g, g]`` patch grid, sums to 1: the encoder rollout's relevance per patch.
        flow_map: ``[g, g]`` patch grid, sums to 1: ``decoder_map`` pushed through the rollout to
            the input patches (answer -> pixels).
        rollout: ``[L, L]`` encoder rollout (L = class token + patches), rows sum to 1.
        token_attention: ``[P']`` mean attention of the answer queries on each image token.
        image_attention_share: fraction of the answer queries' self-attention mass that lands on
            image tokens (splice / prefix fusion; None with cross-attention, where text never
            attends to image positions in self-attention).
    """

    image: np.ndarray
    question: str
    answer: str
    decoder_map: np.ndarray
    encoder_map: np.ndarray
    flow_map: np.ndarray
    rollout: np.ndarray
    token_attention: np.ndarray
    image_attention_share: float | None

    def draw(self, axes: Sequence[Any]) -> None:
        """Draw the image and the three maps onto four matplotlib axes."""
        h, w = self.image.shape[:2]
        share = "" if self.image_attention_share is None else f"\n({self.image_attention_share:.0%} of it on the image)"
        panels = [(None, f"Q: {self.question}\nA: {self.answer}"),
                  (self.decoder_map, f"decoder: answer -> image tokens{share}"),
                  (self.encoder_map, "encoder attention rollout"),
                  (self.flow_map, "answer -> pixels\n(decoder through rollout)")]
        for ax, (heat, title) in zip(axes, panels, strict=True):
            ax.imshow(self.image)
            if heat is not None:
                # vmin 0, so an even map looks even instead of min-max stretched noise; nearest
                # interpolation draws one cell per patch, the resolution the model works at.
                ax.imshow(heat, cmap="inferno", alpha=0.6, vmin=0.0, vmax=float(heat.max()) or 1.0,
                          extent=(0, w, h, 0), interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()

    def figure(self):
        """A new matplotlib ``Figure`` (no pyplot state) with the four panels."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 3.4))
        self.draw(fig.subplots(1, 4))
        fig.tight_layout()
        return fig

    def save(self, path: str | Path) -> Path:
        """Write the figure as PNG; returns the path."""
        from minivlm.io_atomic import atomic_path

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            self.figure().savefig(tmp, dpi=130, format="png")
        return path


def _image_view(pixels: Tensor, normalization: str) -> np.ndarray:
    from minivlm.vision import NORMALIZATIONS

    mean, std = (torch.tensor(v).view(3, 1, 1) for v in NORMALIZATIONS[normalization])
    return (pixels.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _answer_queries(input_ids: list[int], labels: list[int], end_ids: set[int]) -> list[int]:
    """Positions whose outputs predicted the answer's text tokens (the end token if there are none)."""
    supervised = [t - 1 for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]
    text = [q for q in supervised if input_ids[q + 1] not in end_ids]
    return text or supervised


def _answer_attention_on_image(recorder: AttentionRecorder, cfg, input_ids: Tensor,
                               queries: list[int]) -> tuple[Tensor, float | None]:
    """Mean attention of the answer queries on each image token ``[P']`` (over heads, layers and
    queries), and the share of their self-attention mass on image tokens (None when the fusion keeps
    images out of the text stream and attends to them itself, as cross-attention does)."""
    if FUSIONS.get(cfg.fusion.kind).images_in_text_stream:
        image_positions = (input_ids == cfg.image_token_id).nonzero().squeeze(-1)
        per_layer = [p[0][:, queries][:, :, image_positions] for p in recorder.matching(_DECODER_LAYER)]
        share = float(torch.stack([a.sum(-1).mean() for a in per_layer]).mean()) if per_layer else None
    else:
        per_layer = [p[0][:, queries] for p in recorder.matching(_FUSION)]  # [H, Q, P']
        share = None
    if not per_layer:
        raise ExplainError(f"no decoder attention onto the image was recorded (fusion {cfg.fusion.kind!r})")
    return torch.stack([a.mean(dim=(0, 1)) for a in per_layer]).mean(0), share


def explain(model, image: Any, question: str, *, processor=None, answer: str | None = None,
            max_new_tokens: int = 16) -> Explanation:
    """Answer ``question`` about ``image`` and compute the attention maps (see the module docstring).

    Args:
        model: a :class:`~minivlm.model.VisionLanguageModel` (its ``processor`` is used unless given).
        image: anything :func:`minivlm.vision.load_image` accepts (path, PIL image, array).
        question: the user's question.
        answer: explain this answer instead of generating one (teacher forcing).
        max_new_tokens: generation limit for the answer.

    Raises:
        ExplainError: the processor turns the image into several views (``data.split_image``),
            or the projector has no token-to-patch mapping.
    """
    from minivlm.generate import chat

    processor = processor or getattr(model, "processor", None)
    if processor is None:
        raise ExplainError("the model has no processor attached; pass processor= or load a checkpoint that has one")
    cfg = model.config
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    if answer is None:
        answer = chat(model, messages, processor=processor, max_new_tokens=max_new_tokens)
    conversation = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    rendered = processor.render(conversation)
    if rendered.pixel_values.shape[0] != 1:
        raise ExplainError(f"explain needs one view per image; the processor made {rendered.pixel_values.shape[0]} "
                           f"(image splitting is on)")
    tok = processor.tokenizer
    end_ids = {i for i in (tok.im_end_id, tok.eos_id) if i is not None}
    queries = _answer_queries(rendered.input_ids, rendered.labels, end_ids)
    input_ids = torch.tensor([rendered.input_ids], device=model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record_attention(model) as recorder:
            model(input_ids, pixel_values=rendered.pixel_values.to(model.device), return_logits=False)
    finally:
        model.train(was_training)

    encoder_layers = [p[0] for p in recorder.matching(_ENCODER_BLOCK)]
    rollout = attention_rollout(encoder_layers)
    n_prefix = model.encoder.n_prefix  # class token(s) before the patches
    if n_prefix:
        encoder_relevance = rollout[0, n_prefix:]
    else:
        encoder_relevance = rollout[:, n_prefix:].mean(0)

    token_attention, share = _answer_attention_on_image(recorder, cfg, input_ids[0].cpu(), queries)
    patch_weights = tokens_to_patches(token_attention, cfg, [p[0] for p in recorder.matching(_PROJECTOR)])
    g = cfg.encoder.grid_size
    patch_rollout = rollout[n_prefix:, n_prefix:]  # output patch -> input patch, class token left out
    patch_rollout = patch_rollout / patch_rollout.sum(-1, keepdim=True)
    flow = patch_weights.flatten() @ patch_rollout
    return Explanation(
        image=_image_view(rendered.pixel_values[0, : cfg.encoder.in_channels], cfg.encoder.normalization),
        question=question, answer=answer,
        decoder_map=_normalised(patch_weights),
        encoder_map=_normalised(encoder_relevance.view(g, g)),
        flow_map=_normalised(flow.view(g, g)),
        rollout=rollout.numpy(), token_attention=token_attention.numpy(), image_attention_share=share)
