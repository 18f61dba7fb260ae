"""Fused kernels (Triton, FlexAttention) behind the attention entry point."""
