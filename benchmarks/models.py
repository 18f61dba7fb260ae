"""The two implementations the end-to-end benchmarks compare, built at the same shapes.

* **minivlm** at preset ``nanovlm-460m`` (full size): SigLIP2-B/16-512 layout, pixel shuffle x4 +
  bias-free linear, SmolLM2-360M decoder, 460M parameters.
* **the peer**: Hugging Face transformers' Idefics3 classes (the SmolVLM architecture nanoVLM
  follows), built by :func:`idefics3_config` from the same :class:`~minivlm.config.VLMConfig`,
  with random weights: SigLIP vision tower, pixel-shuffle connector with a bias-free linear,
  Llama text model, tied head.

Small size (CPU, CI): preset ``tiny`` adjusted to the peer's connector (one bias-free linear) and
activation, ~2.7M parameters on both sides.

FLOP count for MFU (:meth:`FlopModel.step_flops`), per training step, for useful tokens only (padding
counts nothing; both implementations are credited the same FLOPs for the same data):

* every dense layer: ``6 * params * tokens`` (forward 2, backward 4; Kaplan et al. 2020), with the
  decoder's transformer layers over every real text token (image tokens included), the LM head
  (``V x D``) over *supervised* tokens only (what the loss needs), the vision tower over every
  patch of every image and the projector over every image token;
* attention: ``12 * layers * heads * head_dim`` per allowed (query, key) pair (``QK^T`` and
  ``PV``, 2 FLOPs per multiply-add, x3 for forward + backward): ``L (L + 1) / 2`` pairs for a
  causal document of ``L`` tokens, ``P^2`` for an image of ``P`` patches.

Embedding lookups, norms, activations and the softmax are not counted (PaLM's convention,
Chowdhery et al. 2022, appendix B).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.common import RowSkipped
from minivlm.config import VLMConfig, preset
from minivlm.model import VisionLanguageModel
from minivlm.registry import image_tokens

#: transformers' name for the tanh-approximated GELU minivlm calls ``gelu_tanh``.
_HF_ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}


class PeerUnavailable(RowSkipped):
    """transformers (or its Idefics3 classes) cannot be imported here."""


def benchmark_config(small: bool) -> VLMConfig:
    """``nanovlm-460m``, or ``tiny`` with the peer's connector and activation for ``small``."""
    if not small:
        return preset("nanovlm-460m")
    # Idefics3's vision tower has a plain patch embedding of one frame, so the comparison uses one too.
    return preset("tiny").override("projector.depth=1", "projector.bias=false", "encoder.activation=gelu_tanh",
                                   "encoder.stem=patch", "encoder.temporal_patch_size=1")


def idefics3_config(config: VLMConfig) -> Any:
    """The transformers ``Idefics3Config`` of the same architecture as ``config``.

    Raises:
        ValueError: ``config`` is not expressible as Idefics3 (it needs a ViT encoder without a
            class token, splice fusion, a pixel-shuffle projector of one bias-free linear and a
            Llama decoder).
        PeerUnavailable: transformers is not installed.
    """
    e, p, f, d = config.encoder, config.projector, config.fusion, config.decoder
    problems = []
    if e.kind != "vit" or e.class_token:
        problems.append(f"encoder must be a ViT without class token (got kind={e.kind!r}, class_token={e.class_token})")
    if e.temporal_patch_size != 1:
        problems.append(f"encoder.temporal_patch_size must be 1: Idefics3 patches one frame (got {e.temporal_patch_size})")
    if e.activation not in _HF_ACTIVATIONS:
        problems.append(f"encoder.activation {e.activation!r} has no transformers equivalent")
    if p.kind != "pixel_shuffle" or p.depth != 1 or p.bias:
        problems.append(f"projector must be pixel_shuffle with depth=1, bias=False (got {p.kind}, {p.depth}, {p.bias})")
    if f.kind != "splice":
        problems.append(f"fusion must be splice (got {f.kind!r})")
    if d.kind != "llama":
        problems.append(f"decoder must be llama (got {d.kind!r})")
    if problems:
        raise ValueError("cannot express this config as Idefics3: " + "; ".join(problems))
    try:
        from transformers import Idefics3Config
    except ImportError as error:
        raise PeerUnavailable(f"transformers with Idefics3 is not importable: {error}") from error
    return Idefics3Config(
        vision_config={
            "hidden_size": e.width, "intermediate_size": e.mlp_dim, "num_hidden_layers": e.depth,
            "num_attention_heads": e.n_heads, "image_size": e.image_size, "patch_size": e.patch_size,
            "num_channels": e.in_channels, "hidden_act": _HF_ACTIVATIONS[e.activation], "layer_norm_eps": e.norm_eps,
        },
        text_config={
            "model_type": "llama", "vocab_size": d.vocab_size, "hidden_size": d.width,
            "intermediate_size": d.mlp_dim, "num_hidden_layers": d.n_layers, "num_attention_heads": d.n_heads,
            "num_key_value_heads": d.n_kv_heads, "head_dim": d.resolved_head_dim, "rope_theta": d.rope_theta,
            "rms_norm_eps": d.norm_eps, "max_position_embeddings": d.max_seq_len,
            "tie_word_embeddings": d.tie_embeddings,
        },
        scale_factor=p.shuffle_factor,
        image_token_id=config.image_token_id,
        tie_word_embeddings=d.tie_embeddings,
    )


def build_minivlm(config: VLMConfig, device: torch.device, dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """minivlm with its own initialisation, created directly on ``device``."""
    with torch.device(device):
        model = VisionLanguageModel(config)
    return model.to(dtype=dtype) if dtype is not None else model


def build_idefics3(config: VLMConfig, device: torch.device, attn_implementation: str = "sdpa",
                   dtype: torch.dtype | None = None) -> nn.Module:
    """The peer with random weights, created on ``device`` (see :func:`idefics3_config`)."""
    hf_config = idefics3_config(config)
    from transformers import Idefics3ForConditionalGeneration

    with torch.device(device):
        model = Idefics3ForConditionalGeneration._from_config(hf_config, attn_implementation=attn_implementation)
    model = model.to(device)
    return model.to(dtype=dtype) if dtype is not None else model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of either implementation: vision tower layers, then decoder layers."""
    if isinstance(model, VisionLanguageModel):
        return [*model.encoder.blocks, *model.decoder.layers]
    inner = model.model  # Idefics3ForConditionalGeneration
    return [*inner.vision_model.encoder.layers, *inner.text_model.layers]


def compile_model(model: nn.Module, backend: str, scope: str) -> Callable[..., Any]:
    """``torch.compile`` for a training benchmark; returns what to call instead of ``model``.

    ``scope="model"`` compiles the whole forward (one graph between graph breaks); ``"blocks"``
    compiles each transformer block in place (``nn.Module.compile``, torchtitan's per-block
    compile): blocks of one kind share a graph, so compilation takes one block's time, and the
    glue between blocks (image splicing, masks, the loss) stays eager.
    """
    if scope == "model":
        return torch.compile(model, backend=backend)
    if scope != "blocks":
        raise ValueError(f"compile scope must be 'model' or 'blocks'; got {scope!r}")
    for block in transformer_blocks(model):
        block.compile(backend=backend)
    return model


def count_parameters(module: nn.Module) -> int:
    """Parameters counted once each (tied weights once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def text_token_range(config: VLMConfig) -> tuple[int, int]:
    """``[low, high)`` of ordinary token ids: the side of the vocabulary without the image token."""
    image, vocab = config.image_token_id, config.decoder.vocab_size
    return (0, image) if image > vocab // 2 else (image + 1, vocab)


@dataclass(frozen=True)
class FlopModel:
    """Parameter counts behind :meth:`step_flops`, read off a meta-device copy of the model (no memory).

    Norm weights and biases are counted with the matmul weights they sit beside (< 0.1%).
    """

    config: VLMConfig
    decoder_layer_params: int  # all weights of the decoder's transformer layers
    head_params: int  # V x D
    encoder_params: int  # the vision tower without its position embeddings
    projector_params: int

    @classmethod
    def of(cls, config: VLMConfig) -> "FlopModel":
        with torch.device("meta"):
            model = VisionLanguageModel(config)
        embeddings = sum(p.numel() for name, p in model.encoder.named_parameters() if "pos_embed" in name)
        return cls(
            config=config,
            decoder_layer_params=count_parameters(model.decoder.layers),
            head_params=config.decoder.vocab_size * config.decoder.width,
            encoder_params=count_parameters(model.encoder) - embeddings,
            projector_params=count_parameters(model.projector),
        )

    def step_flops(self, documents: Sequence[tuple[int, int]], n_images: int) -> float:
        """Model FLOPs of one training step (module docstring).

        Args:
            documents: ``(real tokens, supervised tokens)`` per sample, image placeholders included.
            n_images: images encoded in the step.
        """
        e, d = self.config.encoder, self.config.decoder
        attention_width = d.n_heads * d.resolved_head_dim
        flops = 0.0
        for length, supervised in documents:
            flops += 6 * self.decoder_layer_params * length + 6 * self.head_params * supervised
            flops += 12 * d.n_layers * attention_width * length * (length + 1) / 2
        patches = e.n_patches
        flops += n_images * (6 * self.encoder_params * patches + 12 * e.depth * e.width * patches**2)
        flops += n_images * 6 * self.projector_params * image_tokens(self.config)
        return flops
