"""Attention and loss kernels behind the model's layers, each with a plain-PyTorch reference.

* :mod:`~minivlm.kernels.mask`: the :class:`AttentionMask` description and the shared input check;
* :mod:`~minivlm.kernels.dispatch`: the backend table and the ``attention`` entry point;
* :mod:`~minivlm.kernels.reference`: ``math`` and ``sdpa``;
* :mod:`~minivlm.kernels.flex_attention`, :mod:`~minivlm.kernels.triton_attention`: fused
  block-sparse attention for the VLM mask family;
* :mod:`~minivlm.kernels.fused_ce`: LM head + cross-entropy without the ``[tokens, vocab]`` logits.

Importing this package loads nothing: the backend table lives in (and is filled by)
:mod:`minivlm.kernels.dispatch`.
"""
