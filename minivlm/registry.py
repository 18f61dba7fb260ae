"""The four swappable parts: their registries, the built-in variants, and the part contract.

A registry (:class:`~minivlm.registry_base.Registry`) maps a config's ``kind`` string to the class
that builds it, by exact key. The built-in variants are listed below, one line each, and nowhere else: no
part registers itself as a side effect of being imported. Adding a variant is one file plus one
line in its table (or ``PROJECTORS.register("name", MyProjector)`` from outside the package).

The part contract: every registered class is built as ``cls(config: VLMConfig)`` and declares,
as class methods, what the rest of the model needs to know about it without switching on kinds:

* every part: ``check_config(config) -> None``, raising :class:`~minivlm.config.ConfigError`
  that names the offending field (``projector.shuffle_factor: ...``);
* encoder: ``feature_tokens(config) -> int``, the feature tokens ``P`` one image becomes
  (``forward(pixels [N, C, H, W]) -> [N, P, D_img]``);
* projector: ``output_tokens(config, feature_tokens) -> int``, the image tokens ``P'`` it makes of
  them (``forward([N, P, D_img]) -> [N, P', D_txt]``), and ``patch_weights(token_weights [P'],
  config, own_attention) -> [P]``, how a weight on its tokens spreads back over the encoder's
  patches (attention maps, :mod:`minivlm.explain`);
* fusion: ``placeholders_per_image(config, image_tokens) -> int``, the ``<image>`` tokens one
  image occupies in the text stream, and ``images_in_text_stream: bool``, whether the decoder's
  self-attention sees the image tokens (splice, prefix) or the fusion reaches them through its own
  attention and keeps them between decode steps (cross-attention);
* decoder: ``check_config`` only (its shapes are the config's).

:func:`validate_config`, :func:`image_tokens` and :func:`image_seq_len` answer from these.
"""

from __future__ import annotations

from minivlm.config import ConfigError, VLMConfig
from minivlm.decoders.llama import LlamaDecoder
from minivlm.encoders.vit import VisionTransformer
from minivlm.fusion.cross_attention import CrossAttentionFusion
from minivlm.fusion.prefix import PrefixFusion
from minivlm.fusion.splice import SpliceFusion
from minivlm.kernels.dispatch import check_backend
from minivlm.projectors.linear import LinearProjector
from minivlm.projectors.mlp import MLPProjector
from minivlm.projectors.pixel_shuffle import PixelShuffleProjector
from minivlm.projectors.resampler import ResamplerProjector
from minivlm.registry_base import Registry

__all__ = ["DECODERS", "ENCODERS", "FUSIONS", "PROJECTORS", "Registry", "image_seq_len", "image_tokens",
           "validate_config"]

ENCODERS: Registry = Registry("encoder", {
    "vit": VisionTransformer,
})
PROJECTORS: Registry = Registry("projector", {
    "linear": LinearProjector,
    "mlp": MLPProjector,
    "pixel_shuffle": PixelShuffleProjector,
    "resampler": ResamplerProjector,
})
FUSIONS: Registry = Registry("fusion", {
    "splice": SpliceFusion,
    "prefix": PrefixFusion,
    "cross_attention": CrossAttentionFusion,
})
DECODERS: Registry = Registry("decoder", {
    "llama": LlamaDecoder,
})

_PARTS = (("encoder", ENCODERS), ("projector", PROJECTORS), ("fusion", FUSIONS), ("decoder", DECODERS))


def validate_config(config: VLMConfig) -> VLMConfig:
    """The whole check of a config: :meth:`VLMConfig.validate` (what needs no part), every part's
    ``kind``, each registered part's own ``check_config``, and ``attention_backend``.

    Returns ``config``. Raises :class:`~minivlm.config.ConfigError` naming the field.
    """
    config.validate()
    for name, registry in _PARTS:
        kind = getattr(config, name).kind
        if kind not in registry:
            raise ConfigError(f"{name}.kind: unknown {name} {kind!r}; expected one of {registry.names()}")
    for name, registry in _PARTS:
        registry.get(getattr(config, name).kind).check_config(config)
    try:
        check_backend(config.attention_backend)
    except ValueError as error:
        raise ConfigError(f"attention_backend: {error}") from None
    return config


def image_tokens(config: VLMConfig) -> int:
    """Tokens one image becomes after the encoder and the projector (the projector's ``P'``)."""
    features = ENCODERS.get(config.encoder.kind).feature_tokens(config)
    return PROJECTORS.get(config.projector.kind).output_tokens(config, features)


def image_seq_len(config: VLMConfig) -> int:
    """Placeholder tokens one image occupies in the text stream (what the processor writes)."""
    return FUSIONS.get(config.fusion.kind).placeholders_per_image(config, image_tokens(config))
