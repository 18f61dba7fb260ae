"""Parameter and FLOP accounting per part, measured rather than derived by hand.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device, so the
7B preset is summarised without allocating a byte of weights. The reference sample is one image
plus ``text_tokens`` text tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from minivlm.config import VLMConfig
from minivlm.kernels.mask import AttentionMask
from minivlm.model import PARTS, VisionLanguageModel
from minivlm.registry import ENCODERS, image_seq_len, image_tokens


@dataclass
class PartSummary:
    part: str
    kind: str
    params: int
    trainable: int
    forward_flops: int


@dataclass
class ModelSummary:
    name: str
    parts: list[PartSummary]
    image_tokens: int  # tokens one image becomes after the projector
    image_seq_len: int  # placeholder tokens per image in the text stream
    text_tokens: int  # text tokens in the reference sample
    total_params: int
    total_flops: int

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [f"{'part':<10} {'kind':<16} {'params':>15} {'trainable':>15} {'fwd GFLOP/sample':>17}"]
        for p in self.parts:
            rows.append(f"{p.part:<10} {p.kind:<16} {p.params:>15,} {p.trainable:>15,} {p.forward_flops / 1e9:>17.3f}")
        rows.append(f"{'total':<10} {'':<16} {self.total_params:>15,} {'':>15} {self.total_flops / 1e9:>17.3f}")
        rows.append(f"image tokens per image: {self.image_tokens} (text placeholders: {self.image_seq_len}); "
                    f"sample = 1 image + {self.text_tokens} text tokens")
        return "\n".join(rows)


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def count_flops(model: VisionLanguageModel, text_tokens: int = 64) -> dict[str, int]:
    """Forward FLOPs per part for one image + ``text_tokens`` text tokens (runs on the model's device).

    The fusion's share is what the decoder costs with the fusion's inputs and layer hook minus
    what it costs on the same embeddings alone (cross-attention blocks run inside the decoder's
    layers; a splice costs no matmul).
    """
    cfg = model.config
    dev, dtype = model.device, model.decoder.embed.weight.dtype
    e = cfg.encoder
    pixels = torch.zeros(1, e.pixel_channels, e.image_size, e.image_size, device=dev, dtype=dtype)
    n_features, n_image = ENCODERS.get(e.kind).feature_tokens(cfg), image_tokens(cfg)
    placeholders = image_seq_len(cfg)
    T = placeholders + text_tokens
    D = cfg.decoder.width
    flops: dict[str, int] = {}
    with torch.no_grad():
        feats = torch.zeros(1, n_features, e.width, device=dev, dtype=dtype)
        flops["encoder"] = _count(lambda: model.encoder(pixels))
        flops["projector"] = _count(lambda: model.projector(feats))
        embeds = torch.zeros(1, T, D, device=dev, dtype=dtype)
        pos = torch.arange(T, device=dev)[None]
        causal = AttentionMask.causal_lm()
        flops["decoder"] = _count(lambda: model.decoder.logits(model.decoder(embeds, causal, pos)))
        ids = torch.full((1, T), cfg.image_token_id + 1 if cfg.image_token_id == 0 else 0, device=dev)
        ids[0, :placeholders] = cfg.image_token_id
        images = torch.zeros(1, n_image, D, device=dev, dtype=dtype)

        def fused_decoder() -> None:
            fused = model.fusion(embeds, images, ids, causal)
            model.decoder.logits(model.decoder(fused.embeds, fused.mask, pos, layer_hook=fused.layer_hook))

        flops["fusion"] = _count(fused_decoder) - flops["decoder"]
    return flops


def summarize(model_or_config: VisionLanguageModel | VLMConfig, text_tokens: int = 64) -> ModelSummary:
    """Per-part parameters and FLOPs; a config is built on the meta device (no memory)."""
    config = model_or_config if isinstance(model_or_config, VLMConfig) else model_or_config.config
    # FLOPs are counted on a meta-device copy: no memory, and the dispatcher takes the same
    # (countable) kernels whatever device the real model lives on.
    with torch.device("meta"):
        meta_model = VisionLanguageModel(config)
    model = meta_model if isinstance(model_or_config, VLMConfig) else model_or_config
    cfg = model.config
    trainable = {p: model.num_parameters(p, trainable_only=True) for p in PARTS}
    # Frozen for counting: a view of a parameter taken under no_grad (the resampler's expanded
    # latents) still requires grad but has no grad_fn, which FlopCounterMode's tracker rejects.
    meta_model.requires_grad_(False)
    flops = count_flops(meta_model, text_tokens)
    parts = [PartSummary(p, getattr(cfg, p).kind, model.num_parameters(p), trainable[p], flops[p]) for p in PARTS]
    return ModelSummary(cfg.name, parts, image_tokens(cfg), image_seq_len(cfg), text_tokens,
                        model.num_parameters(), sum(flops.values()))
