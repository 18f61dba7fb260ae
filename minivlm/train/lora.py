"""LoRA: low-rank adapters on a frozen model's linear layers (Hu et al. 2021, arXiv:2106.09685).

A frozen ``W [out, in]`` gains a trainable update ``ΔW = (alpha / r) · B A`` with
``A [r, in]`` (Kaiming-uniform, as peft's ``lora.Linear`` and ``nn.Linear`` initialise) and
``B [out, r]`` zeros, so an adapted model starts out computing exactly what the base model does
(paper, section 4.1). Only ``A`` and ``B`` (plus, by default, the projector and fusion weights,
which are new in a VLM anyway) are trained; for a decoder of width ``D`` that is ``2 r D``
parameters per square projection instead of ``D²``.

:class:`LoRALinear` *is* an ``nn.Linear`` holding the base layer's own ``weight`` and ``bias``
parameters, so the state dict keeps the base keys (``decoder.layers.0.attn.q.weight``) and adds
``...q.lora_A`` / ``...q.lora_B``: a base checkpoint still names the same tensors.
:func:`merge_lora` folds ``ΔW`` into ``W`` and puts plain ``nn.Linear`` modules back, giving a
model that :meth:`VisionLanguageModel.from_pretrained` loads without knowing about LoRA.

Example::

    apply_lora(model, parts=("decoder",), r=8, alpha=16)     # freezes all but adapters + projector
    ... train ...
    save_lora(model, "adapters.safetensors")                  # adapters + projector, not the base
    merge_lora(model).save_pretrained("merged/")
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivlm.model import PARTS

log = logging.getLogger(__name__)

#: Linear layers adapted by default, by the last component of their module name. The decoder's
#: attention and SwiGLU projections are the peft/QLoRA "all linear" choice (Dettmers et al.
#: 2023 found adapting every projection matters more than the rank); the LM head stays out, as
#: it is usually tied to the embedding. The encoder's are timm/open_clip's ``qkv``/``proj`` and
#: MLP ``fc1``/``fc2``.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "decoder": ("q", "k", "v", "o", "gate", "up", "down"),
    "encoder": ("qkv", "proj", "fc1", "fc2"),
}
ADAPTER_KEYS = ("lora_A", "lora_B")


class LoRAError(ValueError):
    """Bad LoRA settings, or adapters that do not fit the model they are loaded into."""


class LoRALinear(nn.Linear):
    """``y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ``; ``[..., in] -> [..., out]``.

    Args:
        base: the linear layer to adapt; its ``weight``/``bias`` parameters are reused (and
            frozen), not copied.
        r: adapter rank.
        alpha: scale numerator: the update is multiplied by ``alpha / r``, so that varying
            ``r`` needs less retuning of the learning rate (paper, section 4.1).
        dropout: dropout on the adapter's input only (peft's ``lora_dropout``).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        # Built on the meta device: the base's parameters replace the placeholders, so nothing
        # of size [out, in] is allocated or initialised twice.
        check_lora_settings(r, alpha, dropout)
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scale = r, float(alpha), alpha / r
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> Tensor:
        """``(alpha / r) · B A``: ``[out, in]``, computed in fp32 and cast to the weight's dtype."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        return delta.to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scale

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (in eval mode), sharing no adapter."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            linear.weight = nn.Parameter(self.weight + self.delta_weight(), requires_grad=self.weight.requires_grad)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}"


def check_lora_settings(r: int, alpha: float, dropout: float = 0.0) -> None:
    """Raise :class:`LoRAError` unless ``r >= 1`` (int), ``alpha > 0`` and ``0 <= dropout < 1``."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoRAError(f"LoRA rank r must be a positive integer; got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise LoRAError(f"LoRA alpha must be a finite number > 0; got {alpha!r}")
    if not 0 <= dropout < 1:
        raise LoRAError(f"LoRA dropout must lie in [0, 1); got {dropout!r}")


def apply_lora(model: nn.Module, parts: Sequence[str] = ("decoder",), targets: Sequence[str] | None = None,
               r: int = 8, alpha: float = 16, dropout: float = 0.0, *, train_projector: bool = True,
               train_fusion: bool = True) -> list[str]:
    """Wrap the target linear layers of ``parts`` in :class:`LoRALinear`, in place, and freeze the rest.

    Args:
        model: a :class:`~minivlm.model.VisionLanguageModel` (anything with those part attributes).
        parts: which of ``encoder``/``decoder``/``projector``/``fusion`` to adapt.
        targets: last module-name components to adapt (e.g. ``("q", "v")``, the paper's choice);
            None: :data:`DEFAULT_TARGETS` of each part.
        r, alpha, dropout: see :class:`LoRALinear`.
        train_projector, train_fusion: keep the projector / fusion weights trainable. They are
            new in a VLM (a LLaVA-style fine-tune trains the projector fully), so they are on by
            default; every other base weight is frozen.

    Returns:
        The full names of the adapted modules, in model order.

    Raises:
        LoRAError: bad settings, an unknown part, no linear layer matching ``targets``, a
            target whose weight is tied to another module (a tied LM head), or a model that
            already has adapters.
    """
    check_lora_settings(r, alpha, dropout)
    if not parts or any(p not in PARTS for p in parts):
        raise LoRAError(f"LoRA parts must be a non-empty subset of {PARTS}; got {tuple(parts)}")
    if has_lora(model):
        raise LoRAError("the model already has LoRA adapters; merge_lora() it first to stack another set")
    chosen: list[tuple[str, nn.Linear]] = []
    for part in parts:
        if targets is None and part not in DEFAULT_TARGETS:
            raise LoRAError(f"model.{part} has no default LoRA targets; name its layers with targets=...")
        names = tuple(targets) if targets is not None else DEFAULT_TARGETS[part]
        module = getattr(model, part)
        chosen += [(f"{part}.{name}", child) for name, child in module.named_modules()
                   if isinstance(child, nn.Linear) and name.rsplit(".", 1)[-1] in names]
        if not any(n.startswith(f"{part}.") for n, _ in chosen):
            raise LoRAError(f"no nn.Linear named {list(names)} in model.{part}; "
                            f"its linear layers are {_linear_leaf_names(module)}")
    _refuse_tied(model, chosen)
    for name, linear in chosen:
        _set_submodule(model, name, LoRALinear(linear, r, alpha, dropout))
    mark_only_lora_trainable(model, train_projector=train_projector, train_fusion=train_fusion)
    adapted = [name for name, _ in chosen]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%g on %d layers of %s; %s trainable parameters", r, alpha, len(adapted),
             "/".join(parts), f"{trainable:,}")
    return adapted


def mark_only_lora_trainable(model: nn.Module, *, train_projector: bool = True, train_fusion: bool = True) -> None:
    """Freeze every parameter but the adapters (and the projector / fusion when asked)."""
    model.requires_grad_(False)
    for module in lora_modules(model).values():
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
    for flag, part in ((train_projector, "projector"), (train_fusion, "fusion")):
        if flag and hasattr(model, part):
            getattr(model, part).requires_grad_(True)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only: ``{"<module>.lora_A": [r, in], "<module>.lora_B": [out, r]}``."""
    return {f"{name}.{key}": getattr(m, key).detach() for name, m in lora_modules(model).items()
            for key in ADAPTER_KEYS}


def save_lora(model: nn.Module, path: str | Path, trained_parts: Sequence[str] | None = None) -> Path:
    """Write the adapters, and the fully trained small parts, to a safetensors file.

    The frozen base weights are left out. The projector (and fusion) weights are not: they
    train alongside the adapters (peft's ``modules_to_save``), so without them the adapters
    would be applied to a bridge they were not trained with.

    Args:
        trained_parts: parts saved whole; None: those of ``projector``/``fusion`` that have a
            trainable parameter (what :func:`apply_lora` left trainable).

    The metadata records rank, alpha, the adapted modules and the saved parts.
    """
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise LoRAError("the model has no LoRA adapters to save (apply_lora first)")
    first = next(iter(modules.values()))
    if any((m.r, m.alpha) != (first.r, first.alpha) for m in modules.values()):
        raise LoRAError("save_lora stores one rank and alpha per file; the model mixes several")
    if trained_parts is None:
        trained_parts = [part for part in ("projector", "fusion") if hasattr(model, part)
                         and any(p.requires_grad for p in getattr(model, part).parameters())]
    state = lora_state_dict(model)
    for part in trained_parts:
        state.update({f"{part}.{k}": v for k, v in getattr(model, part).state_dict().items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "lora_rank": str(first.r), "lora_alpha": repr(first.alpha),
                "lora_modules": json.dumps(list(modules)), "trained_parts": json.dumps(list(trained_parts))}
    from minivlm.io_atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    return path


def load_lora(model: nn.Module, path: str | Path) -> list[str]:
    """Load a file written by :func:`save_lora` into ``model``; returns the adapted module names.

    A model without adapters gets them first (the modules, rank and alpha recorded in the file,
    with :func:`apply_lora`'s default freezing), so a base model plus an adapter file is all a
    user needs. A model that has adapters must have exactly the file's.

    Raises:
        LoRAError: the file is not a LoRA file, or names or shapes do not match the model.
    """
    from safetensors import safe_open

    from minivlm.safetensors_io import load_safetensors

    path = Path(path)
    state = load_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "lora_modules" not in metadata:
        raise LoRAError(f"{path} is not a LoRA adapter file (no lora_modules metadata; write it with save_lora)")
    names = json.loads(metadata["lora_modules"])
    r, alpha = int(metadata["lora_rank"]), float(metadata["lora_alpha"])
    if not has_lora(model):
        _wrap_named(model, names, r, alpha)
    own = lora_modules(model)
    if sorted(own) != sorted(names):
        raise LoRAError(f"{path} adapts {len(names)} modules, the model {len(own)}; "
                        f"only in file: {sorted(set(names) - set(own))[:5]}, "
                        f"only in model: {sorted(set(own) - set(names))[:5]}")
    targets = {f"{name}.{key}": getattr(module, key) for name, module in own.items() for key in ADAPTER_KEYS}
    for part in json.loads(metadata.get("trained_parts", "[]")):
        targets.update({f"{part}.{k}": v for k, v in getattr(model, part).state_dict().items()})
    if set(targets) != set(state):
        raise LoRAError(f"{path} does not match the model: missing {sorted(set(targets) - set(state))[:5]}, "
                        f"unexpected {sorted(set(state) - set(targets))[:5]}")
    for key, target in targets.items():
        if state[key].shape != target.shape:
            raise LoRAError(f"{path}: {key} is {list(state[key].shape)}, the model expects {list(target.shape)}")
        with torch.no_grad():
            target.copy_(state[key])
    for module in own.values():
        module.r, module.alpha, module.scale = r, alpha, alpha / r
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore plain ``nn.Linear`` modules, in place.

    The merged model computes what the adapted one does (up to rounding in the weight's dtype)
    and has the base model's architecture and state-dict keys.
    """
    modules = lora_modules(model)
    for name, module in modules.items():
        _set_submodule(model, name, module.merged())
    log.info("merged %d LoRA adapters into their base weights", len(modules))
    return model


def _wrap_named(model: nn.Module, names: Sequence[str], r: int, alpha: float) -> None:
    chosen = []
    for name in names:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise LoRAError(f"the adapter file names module {name!r}, which the model does not have") from None
        if not isinstance(linear, nn.Linear):
            raise LoRAError(f"the adapter file adapts {name!r}, which is a {type(linear).__name__}, not nn.Linear")
        chosen.append((name, linear))
    _refuse_tied(model, chosen)
    for name, linear in chosen:
        _set_submodule(model, name, LoRALinear(linear, r, alpha))
    mark_only_lora_trainable(model)


def _refuse_tied(model: nn.Module, chosen: Sequence[tuple[str, nn.Linear]]) -> None:
    """Merging gives a layer its own weight, which would silently untie a tied one (an LM head)."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name, linear in chosen:
        shared = owners.get(id(linear.weight), [])
        if len(shared) > 1:
            raise LoRAError(f"{name}.weight is tied to {[n for n in shared if n != f'{name}.weight']}; "
                            f"adapting it would untie it when merged (leave it out of targets)")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def _linear_leaf_names(module: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)})
