"""Embedding projectors: image features ``[N, P, D_img]`` -> text-width tokens ``[N, P', D_txt]``."""
from minivlm.projectors.linear import LinearProjector
from minivlm.projectors.mlp import MLPProjector
from minivlm.projectors.pixel_shuffle import PixelShuffleProjector, pixel_shuffle
from minivlm.projectors.resampler import ResamplerProjector

__all__ = ["LinearProjector", "MLPProjector", "PixelShuffleProjector", "ResamplerProjector", "pixel_shuffle"]
