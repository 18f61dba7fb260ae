"""Several linear layers that read the same input, run as one matrix product at inference.

A Llama block projects one normed hidden state three times (query, key, value) and the SwiGLU MLP
twice (gate, up). Training keeps them as separate ``nn.Linear`` modules: LoRA adapts them one by
one (``targets=("q", "v")``), and the Hugging Face and nanoVLM weight maps name them one by one.
Decoding one token at a time on a CPU, though, is bound by per-operator overhead, not by
arithmetic: one product against the stacked weights costs one dispatch instead of three, and the
outputs come out side by side in one tensor, so rotary embedding can rotate query and key in one
call. gpt-fast stores the stacked ``wqkv`` permanently (and converts checkpoints on load); vLLM
stacks at load time. Here generation stacks them for its own steps only, so the parameters,
their names and their gradients stay as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module


#: Groups with more weight elements than this stay separate. Stacking pays where a product is so
#: small that dispatching it costs as much as computing it (the ``tiny`` preset's largest group,
#: gate + up, has 197k elements); for a group of 1M fp32 elements one matrix-vector product reads
#: 4 MB, about 0.3 ms on this project's CPU against ~5 us of dispatch, while stacking would copy
#: those 4 MB on every generation (all of ``nanovlm-460m``'s groups: 0.8 GB, measured at 1-3 s
#: per call on that CPU, where dispatch is a negligible share of each product).
MAX_STACK_ELEMENTS = 1 << 20


class PackedLinears:
    """The stacked weights of every packable group in a model, attached while a decode step runs.

    A module class names its group in ``packed_linears`` (e.g. ``("q", "k", "v")``) and reads
    ``self.packed``: ``(weight [sum(out_i), in], bias or None)`` with
    ``F.linear(x, *self.packed) == torch.cat([self.<name>(x) for name in names], -1)``, or None
    to call its layers one by one. Generation builds one ``PackedLinears`` per prompt, like its KV
    cache, and enters it around the prefill and each decode step (in inference mode; not for a
    compiled step, where the compiler fuses the products itself)::

        packs = PackedLinears(model)
        with torch.inference_mode(), packs:
            logits = decode_step(model, cache, tokens)

    Outside the block every ``packed`` is None again, and with gradients enabled nothing is
    attached. The attribute is shared by every thread, so the modules also read it only when their
    own thread has gradients off: a model training in one thread while another generates keeps its
    gradients on its own layers. Groups are
    chosen when it is built: each of plain ``nn.Linear`` layers that no hook observes (a LoRA
    wrapper or a forward hook keeps its layers separate), with all or no biases and at most
    :data:`MAX_STACK_ELEMENTS` weights (stacking copies them once per generation). Entering checks
    the version counters of the stacked tensors (optimizer steps, ``load_state_dict`` and
    ``copy_`` bump them) and re-stacks when one changed; the check is one pass over ~5 tensors per
    decoder layer because it runs on every token.
    """

    def __init__(self, model: nn.Module):
        # (module, its layers' tensors: weights then biases, the stacked (weight, bias))
        self._groups: list[tuple[nn.Module, list[Tensor], tuple[Tensor, Tensor | None]]] = []
        self._sources: list[Tensor] = []
        if not (_module._global_forward_hooks or _module._global_forward_pre_hooks):
            # (otherwise someone observes every module call: register_module_forward_hook)
            for module in model.modules():
                names = getattr(type(module), "packed_linears", None)
                sources = _sources([module._modules[name] for name in names]) if names else None
                if sources is not None:
                    self._groups.append((module, sources, _stack(sources)))
                    self._sources += sources
        self._versions = [t._version for t in self._sources]

    def __enter__(self) -> PackedLinears:
        if torch.is_grad_enabled():
            return self  # stacks carry no gradients
        if self._versions != [t._version for t in self._sources]:  # weights changed in place
            self._groups = [(module, sources, _stack(sources)) for module, sources, _ in self._groups]
            self._versions = [t._version for t in self._sources]
        for module, _, stacked in self._groups:
            module.__dict__["packed"] = stacked  # a plain attribute: nn.Module.__setattr__ is slow
        return self

    def __exit__(self, *exc) -> None:
        for module, _, _ in self._groups:
            module.__dict__["packed"] = None


def _sources(layers: list[nn.Module]) -> list[Tensor] | None:
    """The weights, then the biases (all or none), of ``layers``; None when they cannot or should
    not be stacked."""
    if any(type(layer) is not nn.Linear or layer._forward_hooks or layer._forward_pre_hooks for layer in layers):
        return None
    if sum(layer.weight.numel() for layer in layers) > MAX_STACK_ELEMENTS:
        return None
    biases = [layer.bias for layer in layers if layer.bias is not None]
    if biases and len(biases) != len(layers):
        return None
    return [layer.weight for layer in layers] + biases


def _stack(sources: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """``(cat(weights), cat(biases) or None)`` of :func:`_sources`' list."""
    n = len(sources) if sources[-1].ndim == 2 else len(sources) // 2
    with torch.inference_mode():
        return torch.cat(sources[:n]), (torch.cat(sources[n:]) if n < len(sources) else None)
