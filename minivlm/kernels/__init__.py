"""Fused kernels (Triton, FlexAttention) behind the attention entry point.

Importing this package registers every backend that can load in this environment with
:func:`minivlm.layers.attention.register_backend`:

* ``"flex"`` (:mod:`minivlm.kernels.flex_attention`) when ``torch.nn.attention.flex_attention``
  exists (torch >= 2.5);
* ``"triton"`` (:mod:`minivlm.kernels.triton_attention`) when Triton imports. On CPU it runs only
  under ``TRITON_INTERPRET=1``, which must be set before this package is imported.

A backend that cannot load is skipped and the reason logged at DEBUG level; ``math`` and ``sdpa``
are always available. :func:`~minivlm.kernels.dispatch.default_backend` picks among them.
"""

from __future__ import annotations

import importlib
import logging

from minivlm.kernels.dispatch import default_backend

__all__ = ["default_backend", "AVAILABLE_BACKENDS"]

logger = logging.getLogger(__name__)

#: Names of the backends this package registered on import.
AVAILABLE_BACKENDS: list[str] = []

for _backend, _module in (("flex", "minivlm.kernels.flex_attention"), ("triton", "minivlm.kernels.triton_attention")):
    try:
        importlib.import_module(_module)
    except (ImportError, RuntimeError) as _error:  # RuntimeError: a Triton install without a usable driver
        logger.debug("attention backend %r not registered: %s", _backend, _error, exc_info=True)
    else:
        AVAILABLE_BACKENDS.append(_backend)
