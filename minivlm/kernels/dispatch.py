"""The one owner of attention dispatch: which backends exist, which one serves a call, and the
entry point every module calls.

Every attention call in minivlm is :func:`attention` ``(q, k, v, mask, backend=...)``. A module
that calls it keeps its choice in an ``attention_backend`` attribute (None: the default table),
which :meth:`minivlm.model.VisionLanguageModel.set_attention_backend` sets on every such module
(encoder blocks, SigLIP's MAP head, the resampler, decoder layers, cross-attention blocks), so
``VLMConfig.attention_backend`` reaches all of them. :func:`override_backend` routes every call
inside a ``with`` block to one function whatever the modules chose (attention maps:
:func:`minivlm.explain.record_attention`).

Backends (:data:`BACKENDS`), listed here and nowhere else:

* ``math`` and ``sdpa`` (:mod:`minivlm.kernels.reference`), always available;
* ``flex`` (:mod:`minivlm.kernels.flex_attention`) where ``torch.nn.attention.flex_attention`` exists;
* ``triton`` (:mod:`minivlm.kernels.triton_attention`) where Triton imports. On CPU it runs only
  under ``TRITON_INTERPRET=1``, which must be set before this module is first imported.

An optional backend that cannot load is left out, its reason kept in :data:`UNAVAILABLE` (and
logged at DEBUG). A new backend is one file plus one line in :data:`_OPTIONAL` (or a call to
:func:`register_backend` for one defined outside the package), and, if it should be a default,
one entry in :data:`DEFAULT_BACKENDS`.

Default choice (measured on one H200, see ``/work/shared/DESIGN.md``):

* plain ``causal`` / ``bidirectional`` masks go to SDPA everywhere: without a mask tensor SDPA
  takes its flash (or cuDNN) path, which no masked kernel beats;
* on CUDA, masks SDPA can only take as a boolean matrix (``prefix_lm``, ``documents``, padded
  kinds) go to FlexAttention, which skips dead blocks (prefix-LM 273 vs 127 TFLOP/s for SDPA with
  a boolean mask; 8 packed documents 80 vs 16). The Triton kernel serves the same kinds and
  measured faster than flex in one H200 run (bf16, B4 H16 S4096 Dh64, fwd / fwd+bwd TFLOP/s of
  useful work: prefix-LM 298 / 278 vs 182 / 227, 8 packed documents 103 / 113 vs 40 / 73); flex
  stays the default until the project's GPU benchmark confirms that;
* ``branches`` (shared-prefix packing) goes to flex on CUDA as well; the Triton kernel does not
  implement the branch rule and refuses such masks;
* on CPU everything goes to SDPA (with a boolean mask where needed): flex has no CPU backward and
  Triton runs on CPU only through its interpreter;
* ``cross`` (Flamingo) masks go to SDPA: neither fused kernel implements the cross rule;
* attention against a KV cache (decode steps, a prefill into the static buffer) stays on SDPA:
  FlexAttention compiles per shape and offset.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

import torch
from torch import Tensor

from minivlm.kernels.mask import MASK_KINDS, AttentionMask, check_attention_inputs
from minivlm.kernels.mask_cache import PerMaskCache
from minivlm.kernels.reference import math_attention, sdpa_attention

__all__ = [
    "AVAILABLE_BACKENDS",
    "BACKENDS",
    "DEFAULT_BACKENDS",
    "MASK_KINDS",
    "PerMaskCache",
    "UNAVAILABLE",
    "attention",
    "check_backend",
    "default_backend",
    "override_backend",
    "pick_backend",
    "register_backend",
]

logger = logging.getLogger(__name__)

#: ``attention(q, k, v, mask, scale=None) -> [B, Hq, T, Dh]``: the contract of every backend.
AttentionFn = Callable[..., Tensor]

#: Backends that need more than PyTorch core: name -> "module:function".
_OPTIONAL = {
    "flex": "minivlm.kernels.flex_attention:flex_attention_backend",
    "triton": "minivlm.kernels.triton_attention:triton_attention",
}

#: The registered backends by name.
BACKENDS: dict[str, AttentionFn] = {"math": math_attention, "sdpa": sdpa_attention}
#: Optional backends that could not load here, with the reason.
UNAVAILABLE: dict[str, str] = {}

for _name, _target in _OPTIONAL.items():
    _module, _function = _target.split(":")
    try:
        BACKENDS[_name] = getattr(importlib.import_module(_module), _function)
    except (ImportError, RuntimeError) as _error:  # RuntimeError: a Triton install without a usable driver
        UNAVAILABLE[_name] = f"{type(_error).__name__}: {_error}"
        logger.debug("attention backend %r not available: %s", _name, _error, exc_info=True)

#: The optional backends that loaded in this environment.
AVAILABLE_BACKENDS: list[str] = [name for name in _OPTIONAL if name in BACKENDS]

#: Default backend per (device type, mask kind) where it is not ``sdpa`` (module docstring).
DEFAULT_BACKENDS: dict[tuple[str, str], str] = {
    ("cuda", "prefix_lm"): "flex",
    ("cuda", "documents"): "flex",
    ("cuda", "branches"): "flex",
    ("cuda", "padded_causal"): "flex",
    ("cuda", "padded_bidirectional"): "flex",
}

_overrides: list[AttentionFn] = []


def register_backend(name: str, fn: AttentionFn) -> None:
    """Add a backend defined outside this package (e.g. an experiment's kernel) under ``name``."""
    if not callable(fn):
        raise ValueError(f"attention backend {name!r} must be callable; got {type(fn).__name__}")
    BACKENDS[name] = fn


def check_backend(name: str | None) -> str | None:
    """``name`` if it is a usable backend, None for ``None`` / ``"auto"`` (the default table).

    Raises:
        ValueError: an unknown name (the known ones listed), or a backend that cannot load here
            (the reason given).
    """
    if name in (None, "auto"):
        return None
    if name in BACKENDS:
        return name
    if name in UNAVAILABLE:
        raise ValueError(f"attention backend {name!r} is not available here ({UNAVAILABLE[name]}); "
                         f"available: auto, {', '.join(sorted(BACKENDS))}")
    raise ValueError(f"unknown attention backend {name!r}; expected one of {['auto', *sorted(BACKENDS)]}")


def default_backend(mask_kind: str, device_type: str) -> str:
    """The backend :func:`attention` uses by default for a mask kind on a device type.

    Args:
        mask_kind: :attr:`AttentionMask.kind`, e.g. ``"prefix_lm"``.
        device_type: ``torch.device.type`` of the query, e.g. ``"cuda"`` or ``"cpu"``.
    Returns:
        The :data:`DEFAULT_BACKENDS` entry when that backend is registered, else ``"sdpa"``.
    Raises:
        ValueError: ``mask_kind`` is not one of :data:`MASK_KINDS`.
    """
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {mask_kind!r}; expected one of {sorted(MASK_KINDS)}")
    name = DEFAULT_BACKENDS.get((device_type, mask_kind), "sdpa")
    return name if name in BACKENDS else "sdpa"


def pick_backend(mask: AttentionMask, device: torch.device, T: int | None = None, S: int | None = None) -> str:
    """The default backend for one call of ``T`` queries against ``S`` keys: attention against a KV
    cache (an offset, or fewer queries than keys: a prefill into a static buffer, a decode step)
    stays on SDPA, which takes any query count without recompiling (FlexAttention would not)."""
    if mask.q_offset or (T is not None and S is not None and T != S and not mask.is_cross):
        return "sdpa"
    return default_backend(mask.kind, device.type)


@contextmanager
def override_backend(fn: AttentionFn) -> Iterator[None]:
    """Every :func:`attention` call inside the block runs ``fn``, whatever backend it asked for.

    Nested blocks stack (the innermost wins); the previous routing is restored on exit, also when
    the block raises.
    """
    _overrides.append(fn)
    try:
        yield
    finally:
        _overrides.pop()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    *,
    backend: str | None = None,
    scale: float | None = None,
) -> Tensor:
    """Scaled dot-product attention under a mask description.

    Args:
        q: ``[B, Hq, T, Dh]``; k, v: ``[B, Hkv, S, Dh]``.
        mask: what each query may see.
        backend: a key of :data:`BACKENDS`, or None/"auto" to choose per device and mask kind.
        scale: softmax scale, default ``1 / sqrt(Dh)``.
    Returns:
        ``[B, Hq, T, Dh]``.
    Raises:
        ValueError: shapes that disagree (:func:`~minivlm.kernels.mask.check_attention_inputs`) or
            an unknown backend.
    """
    check_attention_inputs(q, k, v, mask)
    if _overrides:
        return _overrides[-1](q, k, v, mask, scale=scale)
    if backend in (None, "auto"):
        backend = pick_backend(mask, q.device, q.shape[2], k.shape[2])
    try:
        fn = BACKENDS[backend]
    except KeyError:
        check_backend(backend)  # raises, naming the reason
        raise
    return fn(q, k, v, mask, scale=scale)
