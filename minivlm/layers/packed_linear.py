"""Inference layouts of small linear layers: stacked, transposed, with the norm before them folded in.

A Llama block projects one normed hidden state three times (query, key, value) and the SwiGLU MLP
twice (gate, up). Training keeps them as separate ``nn.Linear`` modules: LoRA adapts them one by
one (``targets=("q", "v")``), and the Hugging Face and nanoVLM weight maps name them one by one.
Decoding one token at a time on a CPU, though, is bound by per-operator overhead and by reading
the weights, not by arithmetic. Three layouts help there:

* **stacking**: one product against the stacked weights costs one dispatch instead of three, and
  the outputs come out side by side in one tensor, so rotary embedding can rotate query and key
  in one call (gpt-fast stores its ``wqkv`` stacked permanently; vLLM stacks at load time);
* **transposing**: ``x [1, in] @ w_t [in, out]`` with ``w_t`` contiguous runs MKL's
  matrix-vector product 1.1-1.35x faster than ``F.linear(x, w)``, which multiplies by the
  transposed view of ``w [out, in]`` (measured on this project's CPU for every decoder shape of
  the ``tiny`` preset; the gap grows when the weights come from L3 rather than L2);
* **folding**: an RMSNorm whose output only feeds one product is ``rms(x)^-1 * (x @ diag(w) W^T)``:
  its weight goes into the product's copy, and ``rms(x)`` is one batched dot product, three
  operators instead of RMSNorm's seven; the residual add after a block's last product goes into
  the same BLAS call (``addmm``).

Together these made a batch-1 decode step of the benchmark's small model ~1.3x faster on the CPU
(``python -m benchmarks.decode_peers``). The results equal the separate layers' up to float
rounding, not bit for bit. Generation builds these layouts for its own steps only, so the
parameters, their names and their gradients stay as they are. The copies are kept with the model
between calls (:meth:`PackedLinears.for_model`): building them copies every small weight once,
which would otherwise cost ~1 ms per ``generate`` call of the ``tiny`` preset.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from minivlm.layers.norms import RMSNorm

#: Groups with more weight elements than this are not copied. The layouts pay where a product is
#: so small that dispatching it costs as much as computing it (the ``tiny`` preset's largest
#: group, gate + up, has 197k elements); for a group of 1M fp32 elements one matrix-vector product
#: reads 4 MB, about 0.3 ms on this project's CPU against ~5 us of dispatch, while the copy would
#: double the memory of every such weight (all of ``nanovlm-460m``'s groups: 0.8 GB).
MAX_STACK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class PackedWeight:
    """One group's product: ``weight_t [in, sum(out_i)]`` contiguous and ``bias [sum(out_i)]`` or None.

    ``packed_linear(x, p) == torch.cat([layer(x) for layer in group], -1)`` up to float rounding.
    With ``rms_eps`` (a ``[1, 1, 1]`` tensor holding the norm's epsilon), the product also applies
    the RMSNorm that precedes the group: the norm's weight is folded into ``weight_t``
    (``norm(x) @ W.T == rms(x)^-1 * (x @ (diag(w) W.T))``), so ``x`` arrives un-normed.
    """

    weight_t: Tensor
    bias: Tensor | None = None
    rms_eps: Tensor | None = None


def packed_linear(x: Tensor, packed: PackedWeight, residual: Tensor | None = None) -> Tensor:
    """``x [..., in] -> [..., sum(out_i)]`` through a :class:`PackedWeight`, plus ``residual``
    (``[..., sum(out_i)]``) if given: a residual add folded into the same BLAS call."""
    shape = x.shape
    x = _rows(x)
    if packed.rms_eps is not None:
        # 1 / rms(x) per row as one batched dot product: eps + (x . x) / D, then rsqrt; the
        # norm's weight is in weight_t (RMSNorm's own kernel runs ~7 operators).
        inv_rms = torch.baddbmm(packed.rms_eps, x[:, None], x[:, :, None], alpha=1 / shape[-1]).rsqrt_()
        x = x * inv_rms.view(-1, 1)
    add = packed.bias
    if residual is not None:
        residual = _rows(residual)
        add = residual if add is None else residual + add
    out = torch.mm(x, packed.weight_t) if add is None else torch.addmm(add, x, packed.weight_t)
    return out if len(shape) == 2 else out.view(*shape[:-1], -1)


def _rows(t: Tensor) -> Tensor:
    """``[..., D] -> [N, D]``; the decoder's flattened tokens are 2-D already (no reshape call)."""
    return t if t.ndim == 2 else t.reshape(-1, t.shape[-1])


class PackedLinears:
    """The packed weights of every packable module in a model, attached while a decode step runs.

    A module class declares its groups in ``packed_linears``, a tuple of tuples of child names
    (e.g. ``(("q", "k", "v"), ("o",))``), and reads ``self.packed``: a tuple with one
    :class:`PackedWeight` per group, or None to call its layers one by one. A module is packed
    whole or not at all: each group must consist of plain ``nn.Linear`` layers that no hook
    observes (a LoRA wrapper or a forward hook keeps the module's layers separate), with all or
    no biases and at most :data:`MAX_STACK_ELEMENTS` weights.

    A block may also declare ``packed_norms``: ``(norm, child)`` name pairs where the
    :class:`~minivlm.layers.norms.RMSNorm` ``norm`` feeds the first group of the packed ``child``.
    When every pair can be folded (fp32, no hooks on the norm or the child), the norms' weights
    are folded into those groups (:class:`PackedWeight` ``rms_eps``) and the block's ``packed``
    is True: it then passes its un-normed input to the child (and may fold its residual adds
    into the child's last product, :func:`packed_linear`'s ``residual``).

    Generation takes one per model (:meth:`for_model`) and enters it around the prefill and each
    decode step (in inference mode; not for a compiled step, where the compiler fuses the
    products itself)::

        packs = PackedLinears.for_model(model)
        with torch.inference_mode(), packs:
            logits = decode_step(model, cache, tokens)

    Outside the block every ``packed`` is None again, and with gradients enabled nothing is
    attached. The attribute is shared by every thread, so the modules also read it only when their
    own thread has gradients off: a model training in one thread while another generates keeps its
    gradients on its own layers. Entering checks the version counters of the source weights
    (optimizer steps, ``load_state_dict`` and ``copy_`` bump them) and rebuilds the copies when one
    changed; the check is one pass over ~9 tensors per decoder layer because it runs on every
    token.
    """

    def __init__(self, model: nn.Module, *, plan: _Plan | None = None):
        """``plan``: :class:`_Plan` ``.of(model)`` when the caller has just found it."""
        self._plan = plan if plan is not None else _Plan.of(model)
        self._build()

    def _build(self) -> None:
        products = {id(module): [_pack(sources) for sources in groups] for module, groups in self._plan.modules}
        for _, pairs in self._plan.folds:
            for norm, child in pairs:
                products[id(child)][0] = _fold(products[id(child)][0], norm)
        self._attached: list[tuple[nn.Module, tuple[PackedWeight, ...] | bool]] = [
            (module, tuple(products[id(module)])) for module, _ in self._plan.modules]
        self._attached += [(block, True) for block, _ in self._plan.folds]
        self._versions = [t._version for t in self._plan.sources]
        self._storage = _storage(self._plan.sources)
        self._samples = _samples(self._plan.sources)

    @classmethod
    def for_model(cls, model: nn.Module) -> PackedLinears:
        """The model's packed weights, reused from its previous generation when still valid.

        Rebuilt when a module was added, replaced, wrapped (LoRA) or hooked since, when a weight
        was replaced by another tensor or its storage swapped (``p.data = ...``), or when a
        sample of its values changed: writes through ``p.data`` do not count as versions, and
        an EMA or a manual update written that way must not leave stale copies. Weights changed
        in place the tracked way (optimizers, ``load_state_dict``, ``copy_``) are re-copied on
        entry. The copies live as long as the model (or until :meth:`forget`).
        """
        plan = _Plan.of(model)
        packs = _BY_MODEL.get(model)
        if (packs is None or not packs._plan.same_as(plan) or packs._storage != _storage(plan.sources)
                or not torch.equal(packs._samples, _samples(plan.sources))):
            packs = _BY_MODEL[model] = cls(model, plan=plan)
        return packs

    @property
    def packed_modules(self) -> list[nn.Module]:
        """The modules whose declared groups run packed."""
        return [module for module, _ in self._plan.modules]

    @property
    def folded_blocks(self) -> list[nn.Module]:
        """The blocks whose norms are folded into their children's products."""
        return [block for block, _ in self._plan.folds]

    @staticmethod
    def forget(model: nn.Module) -> None:
        """Drop the copies :meth:`for_model` keeps for ``model`` (their memory is freed)."""
        _BY_MODEL.pop(model, None)

    def __enter__(self) -> PackedLinears:
        if torch.is_grad_enabled():
            return self  # copies carry no gradients
        if self._versions != [t._version for t in self._plan.sources]:  # weights changed in place
            self._build()
        for module, packed in self._attached:
            module.__dict__["packed"] = packed  # a plain attribute: nn.Module.__setattr__ is slow
        return self

    def __exit__(self, *exc) -> None:
        for module, _ in self._attached:
            module.__dict__["packed"] = None


#: model -> its PackedLinears. Weak keys: a collected model takes its copies with it (the value
#: holds the model's submodules, never the model itself).
_BY_MODEL: weakref.WeakKeyDictionary[nn.Module, PackedLinears] = weakref.WeakKeyDictionary()


@dataclass
class _Plan:
    """What a model packs: ``modules [(module, [sources of each group])]`` and
    ``folds [(block, [(norm, child)])]``; ``sources``: every tensor the copies are made from."""

    modules: list[tuple[nn.Module, list[list[Tensor]]]]
    folds: list[tuple[nn.Module, list[tuple[RMSNorm, nn.Module]]]]
    sources: list[Tensor] = field(init=False)

    def __post_init__(self):
        self.sources = [t for _, groups in self.modules for sources in groups for t in sources]
        self.sources += [norm.weight for _, pairs in self.folds for norm, _ in pairs]

    @classmethod
    def of(cls, model: nn.Module) -> _Plan:
        if _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return cls([], [])  # someone observes every module call (register_module_forward_hook)
        modules, blocks, folds = [], [], []
        for module in model.modules():  # one pass: this runs once per generate call
            kind = type(module)
            if getattr(kind, "packed_linears", None):
                groups = [_sources([module._modules.get(name) for name in names]) for names in kind.packed_linears]
                if all(sources is not None for sources in groups):
                    modules.append((module, groups))
            if getattr(kind, "packed_norms", None):
                blocks.append(module)
        packed = {id(module): groups for module, groups in modules}
        for block in blocks:
            pairs = [(block._modules.get(norm), block._modules.get(child)) for norm, child in type(block).packed_norms]
            if all(_foldable(norm, child, packed) for norm, child in pairs):
                folds.append((block, pairs))
        return cls(modules, folds)

    def same_as(self, other: _Plan) -> bool:
        """True when ``other`` packs and folds the same modules from the same tensors."""
        if [(id(m), len(g)) for m, g in self.modules] != [(id(m), len(g)) for m, g in other.modules]:
            return False
        if [(id(b), [(id(n), id(c)) for n, c in p]) for b, p in self.folds] != \
                [(id(b), [(id(n), id(c)) for n, c in p]) for b, p in other.folds]:
            return False
        mine, theirs = self.sources, other.sources
        return len(mine) == len(theirs) and all(a is b for a, b in zip(mine, theirs))


def _sources(layers: list[nn.Module | None]) -> list[Tensor] | None:
    """The weights, then the biases (all or none), of ``layers``; None when they cannot or should
    not be packed."""
    if any(type(layer) is not nn.Linear or layer._forward_hooks or layer._forward_pre_hooks for layer in layers):
        return None
    if sum(layer.weight.numel() for layer in layers) > MAX_STACK_ELEMENTS:
        return None
    biases = [layer.bias for layer in layers if layer.bias is not None]
    if biases and len(biases) != len(layers):
        return None
    return [layer.weight for layer in layers] + biases


def _foldable(norm: nn.Module | None, child: nn.Module | None, packed: dict[int, list[list[Tensor]]]) -> bool:
    """Whether ``norm``'s weight can be folded into the packed ``child``'s first group: an fp32
    :class:`RMSNorm` of the group's input width, and no hook that would see the un-normed input."""
    if type(norm) is not RMSNorm or child is None or id(child) not in packed:
        return False
    if norm._forward_hooks or norm._forward_pre_hooks or child._forward_hooks or child._forward_pre_hooks:
        return False
    first = packed[id(child)][0][0]
    return norm.weight.dtype == first.dtype == torch.float32 and norm.weight.shape == first.shape[1:]


def _storage(sources: list[Tensor]) -> list[int]:
    """Where each source's values live: ``p.data = other`` moves them without a version bump."""
    return [t.data_ptr() for t in sources]


#: Values sampled per source tensor by :func:`_samples`.
SAMPLES_PER_TENSOR = 8


def _samples(sources: list[Tensor]) -> Tensor:
    """:data:`SAMPLES_PER_TENSOR` values of each source at evenly spaced flat positions, as one
    tensor: a write through ``.data`` (invisible to version counters) that changes the weights
    as a whole, as an EMA or a reload does, changes them. ~0.2 ms per generate call for the
    ``tiny`` model, against ~7 ms to rebuild every copy."""
    if not sources:
        return torch.zeros(0)
    with torch.inference_mode():
        return torch.cat([t.detach().reshape(-1)[:: max(1, t.numel() // SAMPLES_PER_TENSOR)][:SAMPLES_PER_TENSOR]
                          .float() for t in sources])


def _pack(sources: list[Tensor]) -> PackedWeight:
    """The :class:`PackedWeight` of :func:`_sources`' list."""
    n = len(sources) if sources[-1].ndim == 2 else len(sources) // 2
    with torch.inference_mode():
        weight_t = torch.cat(sources[:n]).t().contiguous()
        return PackedWeight(weight_t, torch.cat(sources[n:]) if n < len(sources) else None)


def _fold(packed: PackedWeight, norm: RMSNorm) -> PackedWeight:
    """``packed`` with ``norm`` applied to its input first (:class:`PackedWeight` ``rms_eps``)."""
    with torch.inference_mode():
        weight_t = packed.weight_t * norm.weight[:, None]
        eps = torch.full((1, 1, 1), norm.eps, dtype=weight_t.dtype, device=weight_t.device)
        return PackedWeight(weight_t, packed.bias, eps)
