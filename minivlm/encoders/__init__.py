"""Image encoders: pixels ``[N, C, H, W]`` -> patch features ``[N, P, D]``."""
from minivlm.encoders.vit import VisionTransformer, resize_pos_embed

__all__ = ["VisionTransformer", "resize_pos_embed"]
