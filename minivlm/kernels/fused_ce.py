"""Fused LM head + cross-entropy that never materialises the ``[tokens, vocab]`` logits.

The naive loss ``cross_entropy((hidden @ weight.T).float(), targets)`` holds the logits in the
compute dtype, their fp32 copy and the fp32 log-softmax saved for backward, and creates an fp32
gradient of the same size in backward: at 16k tokens x 49k vocabulary (nanoVLM's SmolLM2 head)
that is ~3 GiB per tensor. Here the tokens are processed in chunks small enough that one chunk's
fp32 logits fit a fixed budget, and each chunk's *gradients* are computed in the forward pass,
while its logits exist anyway:

    logits_c = hidden_c @ weight.T                       [C, V], compute dtype, fp32 below
    lse_c    = logsumexp(logits_c)                       [C]
    loss    += sum(lse_c - logits_c[target])             (ignored rows contribute 0)
    dlogits  = softmax(logits_c) - onehot(target)        [C, V], rows scaled, 0 for ignored rows
    grad_hidden_c  = dlogits @ weight                    [C, D]
    grad_weight   += dlogits.T @ hidden_c                [V, D], fp32 accumulator

Only ``grad_hidden [N, D]`` and ``grad_weight [V, D]`` outlive the forward; backward multiplies
them by the incoming scalar gradient. This is the approach of Liger Kernel (Hsu et al., "Liger
Kernel: Efficient Triton Kernels for LLM Training", 2024, ``ops/fused_linear_cross_entropy.py``)
and of the chunked loss in Unsloth; it does the three matmuls of the naive path once each, where
recomputing logits in backward (Wijmans et al., "Cut Your Losses in Large-Vocabulary Language
Models", 2024) would add a fourth. The price: the gradients are computed even if backward never
runs, so the autograd path is taken only when a gradient is needed (otherwise the loss is
computed chunk by chunk without them).

Numerics: logits are produced in the compute dtype (the autocast dtype under autocast, else the
inputs' dtype) with the matmul's fp32 accumulation, then the log-sum-exp, the softmax and the
loss are fp32, as in the naive path with ``.float()`` logits. ``grad_weight`` is accumulated in
fp32 over chunks and returned in the weight's dtype. The gradient matmuls run in the compute
dtype, except for fp16: its gradient scaler multiplies the loss's gradient only in backward,
after these gradients were computed, so fp16 gradient operands would flush the small
probabilities of unlikely classes to zero (fp16's smallest subnormal is 6e-8); they stay fp32.

Memory: see :func:`auto_chunk_size`. ``benchmarks/memory.py`` and
``tests/kernels/test_fused_ce.py`` measure the peak against the naive path.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "IGNORE_INDEX",
    "REDUCTIONS",
    "auto_chunk_size",
    "fused_linear_cross_entropy",
    "naive_linear_cross_entropy",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
REDUCTIONS = ("sum", "mean")

#: Budget for one chunk's fp32 logits. The chunk's logits also exist in the compute dtype and
#: as the low-precision gradient, so the loss layer's transient peak is ~2x this in bf16 and
#: ~1x in fp32 (the fp32 logits become the gradient in place).
DEFAULT_CHUNK_BYTES = 256 * 2**20

#: Chunks this long or longer are rounded down to a multiple of it, so the matmuls keep
#: tensor-core friendly shapes.
_ROW_MULTIPLE = 64


def auto_chunk_size(n_tokens: int, vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that a chunk's fp32 logits ``[C, V]`` fit ``budget_bytes``.

    At the default 256 MiB: 1344 tokens for a 49k vocabulary, 2048 for 32k. Never more than
    ``n_tokens`` (one chunk when everything fits), never less than one token.

    Raises:
        ValueError: non-positive ``vocab_size`` or ``budget_bytes``, negative ``n_tokens``.
    """
    if vocab_size < 1 or budget_bytes < 1 or n_tokens < 0:
        raise ValueError(
            f"auto_chunk_size needs vocab_size >= 1, budget_bytes >= 1, n_tokens >= 0; "
            f"got vocab_size={vocab_size}, budget_bytes={budget_bytes}, n_tokens={n_tokens}"
        )
    rows = max(1, budget_bytes // (vocab_size * 4))
    if rows >= _ROW_MULTIPLE:
        rows -= rows % _ROW_MULTIPLE
    return max(1, min(rows, n_tokens))


@dataclass(frozen=True)
class _LossSpec:
    """Everything besides the tensors that one chunked pass needs."""

    ignore_index: int
    reduction: str
    chunk_size: int
    compute_dtype: torch.dtype
    grad_hidden: bool
    grad_weight: bool


def _chunked_loss(
    hidden: Tensor, weight: Tensor, targets: Tensor, row_weights: Tensor | None, spec: _LossSpec
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Loss over ``hidden [N, D]``, ``weight [V, D]``, ``targets [N]`` (rows scaled by
    ``row_weights [N]`` when given), and the requested gradients.

    Returns ``(loss, grad_hidden [N, D] in hidden's dtype or None, grad_weight [V, D] in weight's
    dtype or None)``; the gradients are those of ``loss`` itself (incoming gradient 1).
    """
    n_tokens = hidden.shape[0]
    valid = targets != spec.ignore_index
    # mean: one scale for every row, 1 / (number of supervised tokens, or their total weight);
    # nothing supervised -> 0 loss and 0 gradient (F.cross_entropy would return nan).
    if row_weights is not None:
        row_weights = torch.where(valid, row_weights.to(torch.float32), 0.0)
    if spec.reduction == "mean":
        total = valid.sum().to(torch.float32) if row_weights is None else row_weights.sum()
        row_scale = torch.where(total > 0, 1.0 / total, 0.0)
    else:
        row_scale = torch.ones((), dtype=torch.float32, device=hidden.device)
    safe_targets = torch.where(valid, targets, 0).long()  # gather/scatter index dtype
    weight_c = weight.to(spec.compute_dtype)
    # fp16: fp32 gradient operands (module docstring). Under autocast the weight (fp32 master)
    # and the final hidden states (fp32 residual stream) are fp32 already: no copies.
    grad_dtype = torch.float32 if spec.compute_dtype == torch.float16 else spec.compute_dtype
    weight_g = weight_c if grad_dtype == spec.compute_dtype else weight.to(grad_dtype)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if spec.grad_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if spec.grad_weight else None
    for start in range(0, n_tokens, spec.chunk_size):
        rows = slice(start, min(start + spec.chunk_size, n_tokens))
        hidden_c = hidden[rows].to(spec.compute_dtype)
        logits = (hidden_c @ weight_c.T).float()  # [C, V]
        lse = torch.logsumexp(logits, dim=-1)  # [C]
        target_logit = logits.gather(1, safe_targets[rows, None]).squeeze(1)
        chunk_valid = valid[rows]
        # Per-row factor on loss and gradient: 1 on supervised rows (or the row's weight), 0 elsewhere.
        chunk_factor = chunk_valid.to(torch.float32) if row_weights is None else row_weights[rows]
        loss = loss + torch.where(chunk_valid, (lse - target_logit) * chunk_factor, 0.0).sum()
        if grad_hidden is None and grad_weight is None:
            continue
        # d loss / d logits = (softmax - onehot) * scale on supervised rows, 0 elsewhere; built
        # in place in the fp32 logits buffer so the chunk costs one [C, V] fp32 tensor.
        d_logits = logits.sub_(lse[:, None]).exp_()
        d_logits.scatter_add_(1, safe_targets[rows, None], -chunk_valid[:, None].to(torch.float32))
        d_logits.mul_((chunk_factor * row_scale)[:, None])
        d_logits = d_logits.to(grad_dtype)
        if grad_hidden is not None:
            grad_hidden[rows] = d_logits @ weight_g
        if grad_weight is not None:
            grad_weight += d_logits.T @ hidden[rows].to(grad_dtype)
    loss = loss * row_scale
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss, grad_hidden, grad_weight


def _supervised_rows_loss(
    hidden: Tensor, weight: Tensor, targets: Tensor, row_weights: Tensor | None, spec: _LossSpec
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`_chunked_loss` over the supervised rows only; ``grad_hidden`` is scattered back to
    every row (0 on ignored ones). Callers may pass every position of a batch (static shapes)
    without paying the head's matmuls for the prompt and image tokens. On the meta device (memory
    measurements) rows cannot be selected by value and all are computed."""
    if hidden.device.type == "meta":
        return _chunked_loss(hidden, weight, targets, row_weights, spec)
    rows = (targets != spec.ignore_index).nonzero().squeeze(1)
    if rows.numel() == targets.numel():
        return _chunked_loss(hidden, weight, targets, row_weights, spec)
    loss, grad_rows, grad_weight = _chunked_loss(hidden.index_select(0, rows), weight, targets.index_select(0, rows),
                                                 None if row_weights is None else row_weights.index_select(0, rows),
                                                 spec)
    grad_hidden = None
    if grad_rows is not None:
        grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, grad_rows)
    return loss, grad_hidden, grad_weight


@torch.library.custom_op("minivlm::fused_linear_cross_entropy", mutates_args=())
def _fused_op(hidden: Tensor, weight: Tensor, targets: Tensor, row_weights: Tensor | None, ignore_index: int,
              reduction: str, chunk_size: int, compute_dtype: torch.dtype, grad_hidden: bool,
              grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The chunked loss as one opaque operator for ``torch.compile``: the chunk loop runs eagerly
    inside it, so a compiled forward + loss stays one graph. Gradients not asked for come back as
    empty tensors."""
    spec = _LossSpec(ignore_index, reduction, chunk_size, compute_dtype, grad_hidden, grad_weight)
    with _autocast_disabled(hidden.device.type):
        loss, grad_h, grad_w = _supervised_rows_loss(hidden, weight, targets, row_weights, spec)
    empty = hidden.new_empty(0)
    return loss, empty if grad_h is None else grad_h, empty if grad_w is None else grad_w


@_fused_op.register_fake
def _(hidden, weight, targets, row_weights, ignore_index, reduction, chunk_size, compute_dtype, grad_hidden,
      grad_weight):
    empty = hidden.new_empty(0)
    return (hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden) if grad_hidden else empty,
            torch.empty_like(weight) if grad_weight else empty)


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off inside the loss (its dtypes are explicit); a no-op where autocast does not
    exist (the meta device, used to measure memory without computing)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Autograd wrapper: gradients come from the forward pass, backward only rescales them."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, row_weights: Tensor | None,
                spec: _LossSpec) -> Tensor:
        if torch.compiler.is_compiling():
            loss, grad_hidden, grad_weight = _fused_op(
                hidden, weight, targets, row_weights, spec.ignore_index, spec.reduction, spec.chunk_size,
                spec.compute_dtype, spec.grad_hidden, spec.grad_weight)
            grad_hidden = grad_hidden if spec.grad_hidden else None
            grad_weight = grad_weight if spec.grad_weight else None
        else:
            with _autocast_disabled(hidden.device.type):
                loss, grad_hidden, grad_weight = _supervised_rows_loss(hidden, weight, targets, row_weights, spec)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        # Out of place: a second backward through a retained graph must see the stored gradients.
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _validate(hidden: Tensor, weight: Tensor, targets: Tensor, reduction: str, chunk_size: int | None,
              row_weights: Tensor | None = None) -> None:
    if hidden.ndim < 1 or weight.ndim != 2:
        raise ValueError(
            f"expected hidden [..., D] and weight [V, D]; "
            f"got hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden width {hidden.shape[-1]} does not match weight [V, D] = {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}; got {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"targets must be an integer tensor of class indices; got {targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(
            f"hidden, weight and targets must be on one device; got {hidden.device}, {weight.device}, {targets.device}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None (automatic) or an integer >= 1; got {chunk_size!r}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"hidden and weight must be floating point; got {hidden.dtype} and {weight.dtype}")
    if row_weights is not None and (row_weights.shape != targets.shape or not row_weights.is_floating_point()
                                    or row_weights.device != targets.device):
        raise ValueError(
            f"row_weights must be a floating tensor shaped like targets {tuple(targets.shape)} on {targets.device}; "
            f"got {row_weights.dtype} {tuple(row_weights.shape)} on {row_weights.device}"
        )


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``hidden @ weight.T`` runs in: autocast's when enabled, as for ``F.linear``."""
    device_type = hidden.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype outside autocast, "
            f"as for F.linear"
        )
    return hidden.dtype


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "sum",
    chunk_size: int | None = None,
    row_weights: Tensor | None = None,
) -> Tensor:
    """``cross_entropy(hidden @ weight.T, targets)`` without the ``[N, V]`` logits tensor.

    Equal (fp32: to ~1e-6 relative) to :func:`naive_linear_cross_entropy`, loss and gradients
    for ``hidden`` and ``weight`` alike.

    Args:
        hidden: ``[..., D]`` final hidden states (any leading shape; flattened to ``[N, D]``).
        weight: ``[V, D]`` LM-head weight (tied or not; a bias-free head, as in Llama).
        targets: ``[...]`` class indices in ``[0, V)``, or ``ignore_index`` for rows without loss.
            As for ``F.cross_entropy``, other values are not checked (checking needs a device
            sync) and fail inside the gather.
        ignore_index: target value of rows that contribute no loss and no gradient.
        reduction: ``"sum"`` (the trainer's global normalisation) or ``"mean"`` over the
            supervised rows (0 when there are none, where ``F.cross_entropy`` gives nan).
        chunk_size: tokens per chunk; None picks :func:`auto_chunk_size`.
        row_weights: ``[...]`` like ``targets``, a factor on each row's loss and gradient
            (per-sample loss weighting, :mod:`minivlm.train.loss_weighting`); ``"mean"`` then
            divides by the supervised rows' total weight. Not differentiated.
    Returns:
        A 0-d fp32 tensor.
    Raises:
        ValueError: mismatched shapes, devices or dtypes (outside autocast), non-integer targets,
            unknown ``reduction``, non-positive ``chunk_size``.

    Only the supervised rows are projected: ``hidden`` may hold every position of a batch (static
    shapes), ignored rows cost nothing. Under ``torch.compile`` the chunk loop is one opaque
    operator (``torch.ops.minivlm.fused_linear_cross_entropy``): its trip count follows the number
    of supervised tokens, which would otherwise recompile the graph every step, and the graph
    around it stays whole.
    """
    _validate(hidden, weight, targets, reduction, chunk_size, row_weights)
    compute_dtype = _compute_dtype(hidden, weight)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    flat_weights = None if row_weights is None else row_weights.detach().reshape(-1)
    n_tokens = flat_hidden.shape[0]
    if chunk_size is None:
        chunk_size = auto_chunk_size(n_tokens, weight.shape[0])
    grad_enabled = torch.is_grad_enabled()
    spec = _LossSpec(
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=chunk_size,
        compute_dtype=compute_dtype,
        grad_hidden=grad_enabled and hidden.requires_grad,
        grad_weight=grad_enabled and weight.requires_grad,
    )
    if not torch.compiler.is_compiling():  # a log call is a graph break
        logger.debug("fused cross-entropy: %d tokens, vocab %d, chunks of %d, %s", n_tokens, weight.shape[0],
                     chunk_size, compute_dtype)
    if not (spec.grad_hidden or spec.grad_weight):
        if torch.compiler.is_compiling():
            return _fused_op(flat_hidden, weight, flat_targets, flat_weights, ignore_index, reduction, chunk_size,
                             compute_dtype, False, False)[0]
        with _autocast_disabled(hidden.device.type):
            return _supervised_rows_loss(flat_hidden, weight, flat_targets, flat_weights, spec)[0]
    return _FusedLinearCrossEntropy.apply(flat_hidden, weight, flat_targets, flat_weights, spec)


def naive_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = IGNORE_INDEX, reduction: str = "sum",
    row_weights: Tensor | None = None,
) -> Tensor:
    """The reference: full ``[N, V]`` logits, fp32 cross-entropy (what ``VisionLanguageModel.loss_sum``
    computes without fusion). Same contract as :func:`fused_linear_cross_entropy`, except that a
    ``"mean"`` over zero supervised rows is nan, as in ``F.cross_entropy``."""
    _validate(hidden, weight, targets, reduction, None, row_weights)
    logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), weight)
    flat_targets = targets.reshape(-1).long()
    if row_weights is None:
        return torch.nn.functional.cross_entropy(logits.float(), flat_targets, ignore_index=ignore_index,
                                                 reduction=reduction)
    per_row = torch.nn.functional.cross_entropy(logits.float(), flat_targets, ignore_index=ignore_index,
                                                reduction="none")
    factor = torch.where(flat_targets != ignore_index, row_weights.reshape(-1).float(), 0.0)
    total = (per_row * factor).sum()
    return total if reduction == "sum" else total / factor.sum()
