"""Causal text decoders: embeddings ``[B, T, D]`` -> hidden states -> logits."""
from minivlm.decoders.llama import LlamaDecoder

__all__ = ["LlamaDecoder"]
