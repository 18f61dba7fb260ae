"""Shared building blocks: attention entry point, norms, MLPs, rotary embeddings, KV cache."""
from minivlm.layers.attention import AttentionMask, attention

__all__ = ["AttentionMask", "attention"]
