"""Shared building blocks: norms, MLPs, rotary embeddings, the KV cache, initialisation.

Attention itself (the mask description, the backends and the one entry point) lives in
:mod:`minivlm.kernels`: layers call :func:`minivlm.kernels.dispatch.attention`.
"""
