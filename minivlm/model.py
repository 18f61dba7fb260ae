"""``VisionLanguageModel``: image encoder -> embedding projector -> fusion -> text decoder.

The LLaVA-style composition (Liu et al. 2023): each part is chosen by exact registry key from
:class:`~minivlm.config.VLMConfig`, so swapping one is a config change.

    pixels [N, C, H, W] --encoder--> [N, P, D_img] --projector--> [N, P', D_txt]
    input_ids [B, T] --embed--> [B, T, D_txt] --fusion(images)--> decoder --> logits [B, T, V]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivlm.config import VLMConfig, preset
from minivlm.kernels.dispatch import check_backend
from minivlm.kernels.fused_ce import fused_linear_cross_entropy
from minivlm.kernels.mask import AttentionMask
from minivlm.layers.init import init_linear_
from minivlm.layers.kv_cache import StaticKVCache
from minivlm.fusion.base import check_placeholders
from minivlm.registry import DECODERS, ENCODERS, FUSIONS, PROJECTORS, image_seq_len, validate_config
from minivlm.retrieval_head import (
    HEAD_CONFIG_NAME,
    HEAD_WEIGHTS_NAME,
    RetrievalConfig,
    RetrievalHead,
    load_head_files,
    save_head_files,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PARTS = ("encoder", "projector", "fusion", "decoder")
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
_HEAD_PREFIX = "retrieval_head."
#: What :meth:`VisionLanguageModel.save_pretrained` writes (with the processor and retrieval head).
MODEL_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, "processor_config.json", "tokenizer.model",
                         HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME})


@dataclass
class VLMOutput:
    """loss: mean cross-entropy over supervised tokens (None without labels); with
    ``loss_weights``, the weighted mean.
    loss_sum / n_supervised: the same as a sum and a count (the total weight, with
    ``loss_weights``), for global normalisation across micro-batches and ranks.
    logits: ``[B, T, V]`` (None when ``return_logits=False``).
    hidden: ``[B, T, D]`` final decoder states."""

    loss: Tensor | None
    logits: Tensor | None
    hidden: Tensor
    loss_sum: Tensor | None = None
    n_supervised: Tensor | None = None


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the model built from its config."""


class VisionLanguageModel(nn.Module):
    """The four parts composed behind one ``forward``.

    Example::

        model = VisionLanguageModel(preset("tiny"))
        out = model(input_ids, pixel_values=pixels, labels=labels)
        out.loss.backward()
    """

    def __init__(self, config: VLMConfig):
        super().__init__()
        validate_config(config)
        self.config = config
        self.encoder = ENCODERS.get(config.encoder.kind)(config)
        self.projector = PROJECTORS.get(config.projector.kind)(config)
        self.fusion = FUSIONS.get(config.fusion.kind)(config)
        self.decoder = DECODERS.get(config.decoder.kind)(config)
        self.processor: Any = None  # a minivlm.text.Processor travels with the model when attached
        # Optional contrastive head (minivlm.retrieval): declared here, so saving, loading, .to()
        # and optimisers see it as part of the model once added (add_retrieval_head).
        self.register_module("retrieval_head", None)
        self.set_attention_backend(config.attention_backend)
        # Parts keep their own special cases (embeddings, conv stem, zero gates); every linear
        # layer starts LeCun-normal, which leaves the language-prior plateau much sooner.
        init_linear_(self)

    # ---- construction helpers -------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, *overrides: str) -> "VisionLanguageModel":
        return cls(preset(name).override(*overrides))

    def set_attention_backend(self, backend: str | None) -> None:
        """Route every attention call of the model to one backend (None/"auto": the default table).

        Every module that calls :func:`~minivlm.kernels.dispatch.attention` keeps its choice in an
        ``attention_backend`` attribute (encoder blocks, the MAP head, resampler layers, decoder
        layers, cross-attention blocks); all of them are set here.

        Raises:
            ValueError: an unknown backend, or one that cannot load here.
        """
        backend = check_backend(backend)
        for module in self.modules():
            if hasattr(module, "attention_backend"):
                module.attention_backend = backend

    def add_retrieval_head(self, config: RetrievalConfig | None = None) -> RetrievalHead:
        """A new :class:`~minivlm.retrieval_head.RetrievalHead` on the model's device and dtype, from the
        encoder's pooled embedding width and the decoder's width; replaces any previous head."""
        weight = self.decoder.embed.weight
        head = RetrievalHead(self.encoder.embed_dim, self.config.decoder.width, config)
        self.retrieval_head = head.to(device=weight.device, dtype=weight.dtype)
        return self.retrieval_head

    @property
    def device(self) -> torch.device:
        return self.decoder.embed.weight.device

    def part(self, name: str) -> nn.Module:
        if name not in PARTS:
            raise ValueError(f"unknown part {name!r}; expected one of {PARTS}")
        return getattr(self, name)

    def freeze(self, *parts: str) -> "VisionLanguageModel":
        """Stop gradients to the named parts (all four when none are named)."""
        for name in parts or PARTS:
            self.part(name).requires_grad_(False)
        return self

    def unfreeze(self, *parts: str) -> "VisionLanguageModel":
        for name in parts or PARTS:
            self.part(name).requires_grad_(True)
        return self

    def num_parameters(self, part: str | None = None, trainable_only: bool = False) -> int:
        module = self if part is None else self.part(part)
        seen, total = set(), 0
        for p in module.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    # ---- forward ----------------------------------------------------------------------------
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """``[N, C, H, W] -> [N, P', D_txt]`` image tokens in the decoder's width
        (``C = in_channels * temporal_patch_size``: stacked frames, see :class:`EncoderConfig`).

        Without gradients, an image that repeats in the batch is encoded once and its tokens are
        copied to every repeat (equal to encoding the whole batch up to the rounding of a smaller
        batch's products): a batch of questions about a few images, as evaluation generates them,
        costs the encoder only those images."""
        e = self.config.encoder
        expected = (e.pixel_channels, e.image_size, e.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must have shape [N, {', '.join(map(str, expected))}]; "
                             f"got {list(pixel_values.shape)}")
        if pixel_values.shape[0] > 1 and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # Inference batches often repeat an image (every question about it is its own
            # conversation): encode each distinct image once. Reading which rows repeat is a host
            # sync, so training (grads on) and compiled graphs keep the plain path.
            distinct, where = torch.unique(pixel_values.flatten(1), dim=0, return_inverse=True)
            if distinct.shape[0] < pixel_values.shape[0]:
                return self._encode(distinct.view(-1, *pixel_values.shape[1:]))[where]
        return self._encode(pixel_values)

    def _encode(self, pixel_values: Tensor) -> Tensor:
        return self.projector(self.encoder(pixel_values.to(self.encoder.pos_embed.dtype)))

    def check_inputs(self, input_ids: Tensor, pixel_values: Tensor | None = None) -> None:
        """The checks that read values: ids inside the vocabulary, and as many image placeholders as
        the images need (the fusion's ``placeholders_per_image``). Raises ValueError naming what
        disagrees.

        Each reads the device (a host sync), so they belong where data enters: the processor and
        collator build consistent batches, and :meth:`forward` runs this only with ``validate=True``
        and never while ``torch.compile`` traces it.
        """
        self._check_ids_shape(input_ids)
        vocab = self.config.decoder.vocab_size
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= vocab:
                raise ValueError(f"input_ids must lie in [0, {vocab}); got values in [{lo}, {hi}]")
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        check_placeholders(input_ids, self.config.image_token_id, n_images, image_seq_len(self.config))

    @staticmethod
    def _check_ids_shape(input_ids: Tensor) -> None:
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor [B, T]; got {input_ids.dtype} {list(input_ids.shape)}")

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        branch_ids: Tensor | None = None,
        cache: StaticKVCache | None = None,
        return_logits: bool = True,
        loss_weights: Tensor | None = None,
        validate: bool = True,
    ) -> VLMOutput:
        """Run the model: training, scoring, a prompt's prefill and every decode step alike.

        Args:
            input_ids: ``[B, T]`` token ids with image placeholders (``config.image_token_id``).
            pixel_values: ``[N, C, H, W]``, the images of the whole batch in placeholder order.
            labels: ``[B, T]`` targets aligned with input_ids (shifted inside), -100 = ignored.
            attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding (with a cache: of the new
                tokens; the cache remembers the earlier ones).
            position_ids: ``[B, T]``; default: counts real tokens (so left padding starts at 0),
                continuing the cache's count.
            document_ids: ``[B, T]`` packed-document ids (block-diagonal attention); training only.
            branch_ids: ``[B, T]`` shared-prefix branches (0 = prefix, k = k-th continuation; a
                branch does not see its siblings); training only, with explicit ``position_ids``
                (:func:`minivlm.data.collate.merge_shared_prefix` builds both).
            cache: a :class:`StaticKVCache` (``model.decoder.new_cache``): the new tokens' keys and
                values are written into it and attention reads all it holds. A decode step is this
                forward with one token per row.
            return_logits: False skips the full ``[B, T, V]`` logits (the loss then projects only
                supervised positions).
            loss_weights: ``[B, T]`` float, aligned with ``labels``: each supervised token's weight
                in the loss (:mod:`minivlm.train.loss_weighting`); default 1.
            validate: run :meth:`check_inputs` first (host syncs; skipped while compiling). Callers
                whose data was checked where it entered pass False (generation does; a training
                loop fed by the processor and collator may).

        Nothing else reads a tensor's values on the host (an eager forward into a KV cache with an
        ``attention_mask`` reads once whether it pads, see :class:`StaticKVCache`; an eager forward
        without gradients reads which images repeat, see :meth:`encode_images`): with
        ``validate=False``, or compiled, training forward + loss and a decode step are each one graph.
        """
        self._check_shapes(input_ids, attention_mask, position_ids, document_ids, branch_ids, cache, labels,
                           loss_weights)
        if validate and not torch.compiler.is_compiling():
            self.check_inputs(input_ids, pixel_values)
        B, T = input_ids.shape
        image_embeds = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            image_embeds = self.encode_images(pixel_values)

        # An attention mask means padding may be present: its rows keep a key_valid mask (an
        # all-ones mask costs SDPA its flash kernel; pass None when nothing is padded).
        key_valid = None if attention_mask is None else attention_mask.bool()
        q_offset, position_limit = 0, None
        if cache is not None:
            q_offset, cached_positions = cache.reserve(T, key_valid)
            key_valid = cache.attention_key_valid()
            if position_ids is None:  # the cache counts positions: each lies below its length
                position_ids, position_limit = cached_positions, cache.max_len
        elif position_ids is None:
            if key_valid is not None:
                position_ids = (key_valid.long().cumsum(-1) - 1).clamp_min(0)
            else:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        mask = AttentionMask(causal=True, q_offset=q_offset, key_valid=key_valid, document_ids=document_ids,
                             branch_ids=branch_ids)

        text_embeds = self.decoder.embed(input_ids)
        fused = self.fusion(text_embeds, image_embeds, input_ids, mask, cache)
        hidden = self.decoder(fused.embeds, fused.mask, position_ids, cache, fused.layer_hook, position_limit)

        logits = self.decoder.logits(hidden) if return_logits else None
        loss = loss_sum = n_sup = None
        if labels is not None:
            loss_sum, n_sup = self.loss_sum(hidden, labels, logits, loss_weights)
            floor = 1 if loss_weights is None else torch.finfo(torch.float32).tiny  # weight totals may be < 1
            loss = loss_sum / n_sup.clamp_min(floor)  # nothing supervised: 0, not nan
        return VLMOutput(loss=loss, logits=logits, hidden=hidden, loss_sum=loss_sum, n_supervised=n_sup)

    def _check_shapes(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                      document_ids: Tensor | None, branch_ids: Tensor | None, cache: StaticKVCache | None,
                      labels: Tensor | None, loss_weights: Tensor | None) -> None:
        """Shapes and combinations only: Python-level, nothing read from the device."""
        self._check_ids_shape(input_ids)
        B, T = input_ids.shape
        if branch_ids is not None and (cache is not None or tuple(branch_ids.shape) != (B, T)):
            raise ValueError(f"branch_ids must be [B, T] = [{B}, {T}] and used without a KV cache; "
                             f"got {list(branch_ids.shape)}{' with a cache' if cache is not None else ''}")
        for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids),
                            ("document_ids", document_ids), ("labels", labels)):
            if value is not None and tuple(value.shape) != (B, T):
                raise ValueError(f"{name} must match input_ids [B, T] = [{B}, {T}]; got {list(value.shape)}")
        if loss_weights is not None and (labels is None or loss_weights.shape != labels.shape):
            raise ValueError(f"loss_weights must match labels {list(input_ids.shape)}; got {list(loss_weights.shape)}")
        if cache is not None and document_ids is not None:
            raise ValueError("document_ids describe packed training rows; they are not used with a KV cache")
        if branch_ids is not None and position_ids is None:
            raise ValueError("branch_ids need position_ids: each branch continues the prefix's positions")

    def loss_sum(self, hidden: Tensor, labels: Tensor, logits: Tensor | None = None,
                 loss_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Summed next-token cross-entropy and the number of supervised tokens; with
        ``loss_weights [B, T]``, the weighted sum and the supervised tokens' total weight.

        Position ``t`` predicts ``labels[t + 1]``; ignored targets (-100) contribute nothing. Every
        shape is static (no boolean selection of the supervised rows), so the loss compiles into
        the forward's graph. Without logits only supervised positions are projected to the
        vocabulary: in VLM instruction data most tokens are prompt or image. With
        ``train.fused_loss`` (default) the projection and the loss run in token chunks
        (:func:`minivlm.kernels.fused_ce.fused_linear_cross_entropy`, which picks the supervised
        rows itself), so the ``[tokens, vocab]`` logits never exist.
        """
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        weights = None if loss_weights is None else torch.where(keep, loss_weights[:, 1:].float(), 0.0)
        n_sup = keep.sum() if weights is None else weights.sum()

        def cross_entropy(rows_logits: Tensor, rows_targets: Tensor, rows_weights: Tensor | None) -> Tensor:
            if rows_weights is None:
                return F.cross_entropy(rows_logits.float(), rows_targets, ignore_index=IGNORE_INDEX, reduction="sum")
            per_token = F.cross_entropy(rows_logits.float(), rows_targets, ignore_index=IGNORE_INDEX, reduction="none")
            return (per_token * rows_weights).sum()

        flat_weights = None if weights is None else weights.flatten()
        if logits is not None:
            return cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), flat_weights), n_sup
        head = self.decoder.lm_head
        if self.config.train.fused_loss and type(head) is nn.Linear and head.bias is None:
            return fused_linear_cross_entropy(hidden[:, :-1], head.weight, targets, row_weights=weights), n_sup
        # A LoRA-adapted head is not a plain nn.Linear and takes the unfused path. Eagerly only the
        # supervised rows are projected; a compiled graph projects every row (static shapes).
        rows = hidden[:, :-1].flatten(0, 1)
        flat_targets = targets.flatten()
        if not torch.compiler.is_compiling():
            selected = keep.flatten()
            return cross_entropy(self.decoder.logits(rows[selected]), flat_targets[selected],
                                 None if flat_weights is None else flat_weights[selected]), n_sup
        return cross_entropy(self.decoder.logits(rows), flat_targets, flat_weights), n_sup

    # ---- checkpoints ------------------------------------------------------------------------
    def _tied_keys(self) -> set[str]:
        return {"decoder.lm_head.weight"} if self.config.decoder.tie_embeddings else set()

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ the processor's files when attached).

        ``state_dict`` overrides the module's own (a full state gathered from FSDP shards).
        The model files are replaced as a whole (:func:`minivlm.io_atomic.write_directory`): a
        crash or a full disk at any moment leaves the previous model loadable; other files in
        ``directory`` are kept.
        """
        from safetensors.torch import save_file

        from minivlm.io_atomic import write_directory

        tied = self._tied_keys()
        source = state_dict if state_dict is not None else self.state_dict()
        state = {k: v.detach().contiguous().cpu() for k, v in source.items()
                 if k not in tied and not k.startswith(_HEAD_PREFIX)}
        head = getattr(self, "retrieval_head", None)
        head_state = {k[len(_HEAD_PREFIX):]: v for k, v in source.items() if k.startswith(_HEAD_PREFIX)}

        def write(out: Path) -> None:
            self.config.to_json(out / CONFIG_NAME)
            save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "minivlm_config": self.config.name})
            if self.processor is not None:
                self.processor.save_pretrained(out)
            if head is not None:  # its own files: model.safetensors is the same with or without one
                save_head_files(head, out, head_state or None)

        return write_directory(directory, write, owned=MODEL_FILES)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        load_processor: bool = True) -> "VisionLanguageModel":
        from minivlm.safetensors_io import load_safetensors

        d = Path(directory)
        if not (d / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{d} is not a minivlm checkpoint: {CONFIG_NAME} is missing")
        config = VLMConfig.from_json(d / CONFIG_NAME)
        state = load_safetensors(d / WEIGHTS_NAME, device=str(map_location))
        if config.encoder.stem == "conv" and "encoder.patch_embed.linear.weight" in state:
            # Saved before `conv` (the stack alone) and `hybrid` (stack + linear path) were told
            # apart, when `conv` meant the hybrid: the weights say which stem they belong to.
            config.encoder.stem = "hybrid"
        model = cls(config)
        model.load_checkpoint_state(state)
        model.retrieval_head = load_head_files(d, model.encoder.embed_dim, config.decoder.width, map_location)
        if load_processor and (d / "processor_config.json").is_file():
            from minivlm.text.processor import Processor

            model.processor = Processor.from_pretrained(d)
        return model.to(map_location)

    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        """Load weights, failing with every missing, unexpected and shape-mismatched key listed."""
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(_HEAD_PREFIX)}  # saved apart
        tied = self._tied_keys()
        missing = sorted(k for k in own if k not in state and k not in tied)
        unexpected = sorted(k for k in state if k not in own)
        mismatched = sorted(f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
                            for k in state if k in own and state[k].shape != own[k].shape)
        if missing or unexpected or mismatched:
            lines = []
            for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
                if keys:
                    lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
            raise CheckpointMismatchError("checkpoint does not match the model built from its config:\n" + "\n".join(lines))
        self.load_state_dict(state, strict=False)
