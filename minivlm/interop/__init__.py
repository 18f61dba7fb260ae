"""Weight import and export: timm, open_clip and Hugging Face checkpoints into minivlm's own modules.

Nothing foreign is wrapped. Every importer has the same three layers, one module per family
(:mod:`~minivlm.interop.timm_vit`, :mod:`~minivlm.interop.open_clip`,
:mod:`~minivlm.interop.hf_llama`, :mod:`~minivlm.interop.llava`):

1. a config function deriving the minivlm part config from the foreign model's config;
2. a pure key-mapping function ``foreign state dict -> MappedState`` (minivlm keys, plus every
   foreign key that found no home and every key the layout needed but the source lacked);
3. a loader that checks the mapped state against the minivlm module and refuses, listing
   **every** offending key at once, if anything is unmapped, absent, unexpected, missing or of
   the wrong shape. Nothing is silently left at its random initialisation.

This module holds the machinery the families share: :class:`StateMapper` (records what a
mapping consumed), :class:`MappedState`, :func:`verify_mapped` / :func:`load_mapped`, and the
errors. :mod:`~minivlm.interop.convert` turns any source into a minivlm checkpoint directory and
initialises single parts from one (``encoder.init_from=DIR``); whole VLMs
(:mod:`~minivlm.interop.idefics3` for SmolVLM, :mod:`~minivlm.interop.llava`,
:mod:`~minivlm.interop.nanovlm`) become complete checkpoints with the processor that
:mod:`~minivlm.interop.hf_processor` builds from their own files, and
:mod:`~minivlm.interop.hf_export` writes them back. :mod:`~minivlm.interop.hub` resolves a hub id
in the local cache; :mod:`~minivlm.interop.reference` builds small random-weight reference
checkpoints with transformers; :mod:`~minivlm.interop.export` writes a decoder back out as a
Hugging Face Llama directory; :mod:`~minivlm.interop.vocab` grows the vocabulary for added
special tokens.

Files are only read through :mod:`~minivlm.safetensors_io`: safetensors, or
``torch.load(weights_only=True)`` for ``.bin``/``.pt``; nothing else is unpickled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class WeightMappingError(ValueError):
    """Foreign weights do not map one-to-one onto a minivlm module.

    Every problem is listed, grouped by kind, so one run shows everything that needs fixing:

    * ``unmapped``: source keys no mapping rule consumed (e.g. a layer-scale ``ls1.gamma``);
    * ``absent``: source keys the derived layout requires but the file lacks (a truncated export);
    * ``unexpected``: mapped keys the minivlm module does not have (config and weights disagree);
    * ``missing``: module keys the mapping did not provide (they would stay random);
    * ``mismatched``: ``"key: source [..] vs model [..]"`` shape disagreements.
    """

    def __init__(self, source: str, *, unmapped: Iterable[str] = (), absent: Iterable[str] = (),
                 unexpected: Iterable[str] = (), missing: Iterable[str] = (), mismatched: Iterable[str] = ()):
        self.source = source
        self.unmapped = sorted(unmapped)
        self.absent = sorted(absent)
        self.unexpected = sorted(unexpected)
        self.missing = sorted(missing)
        self.mismatched = sorted(mismatched)
        groups = (
            ("source keys with no minivlm counterpart", self.unmapped),
            ("keys the layout needs but the source lacks", self.absent),
            ("mapped keys the minivlm module does not have", self.unexpected),
            ("minivlm keys left without weights", self.missing),
            ("shape mismatches", self.mismatched),
        )
        lines = [f"  {title} ({len(keys)}): {', '.join(keys)}" for title, keys in groups if keys]
        super().__init__(f"{source}: weights do not map onto the minivlm module:\n" + "\n".join(lines))

    @property
    def has_problems(self) -> bool:
        return any((self.unmapped, self.absent, self.unexpected, self.missing, self.mismatched))


class UnsupportedLayoutError(ValueError):
    """The foreign model uses a feature minivlm's modules do not implement (e.g. layer scale).

    Raised by the config functions before any weight is touched, naming every such feature.
    """

    def __init__(self, source: str, reasons: Iterable[str]):
        self.reasons = list(reasons)
        bullet = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"{source}: this layout cannot be represented by minivlm's modules:\n{bullet}")


def raise_if_unsupported(source: str, reasons: list[str]) -> None:
    """Raise :class:`UnsupportedLayoutError` listing ``reasons`` when there are any."""
    if reasons:
        raise UnsupportedLayoutError(source, reasons)


@dataclass
class MappedState:
    """The result of mapping a foreign state dict onto minivlm names.

    state: minivlm key -> tensor (source dtype kept; loading casts to the module's dtype).
    unmapped: source keys no rule consumed. absent: source keys the layout needed but lacked.
    skipped: source key -> why it is deliberately not imported (e.g. a tied head, a buffer that
    minivlm recomputes); logged, never silent.
    """

    state: dict[str, Tensor]
    unmapped: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def checked(self, source: str = "checkpoint") -> dict[str, Tensor]:
        """The mapped state, or :class:`WeightMappingError` if any source key was unmapped or absent."""
        if self.unmapped or self.absent:
            raise WeightMappingError(source, unmapped=self.unmapped, absent=self.absent)
        return self.state


class StateMapper:
    """Moves tensors from a foreign state dict to minivlm names and remembers what was consumed.

    A mapping function drives it from the *expected* layout (derived from the config): every
    tensor the layout needs is ``move``-d or ``fuse``-d; a needed key the source lacks is recorded
    as absent; whatever the source holds beyond that is reported as unmapped by :meth:`result`.
    """

    def __init__(self, foreign: Mapping[str, Tensor]):
        self.foreign = foreign
        self.state: dict[str, Tensor] = {}
        self._used: set[str] = set()
        self._absent: list[str] = []
        self._skipped: dict[str, str] = {}

    def take(self, key: str) -> Tensor | None:
        """The source tensor under ``key``, marked as consumed; None (recorded absent) if missing."""
        if key not in self.foreign:
            self._absent.append(key)
            return None
        self._used.add(key)
        return self.foreign[key]

    def move(self, src: str, dst: str, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        """``state[dst] = transform(foreign[src])``."""
        tensor = self.take(src)
        if tensor is not None:
            self.state[dst] = transform(tensor) if transform is not None else tensor

    def fuse(self, srcs: Iterable[str], dst: str, dim: int = 0) -> None:
        """Concatenate several source tensors into one (separate q/k/v -> fused ``qkv``)."""
        parts = [self.take(k) for k in srcs]
        if all(p is not None for p in parts):
            self.state[dst] = torch.cat(parts, dim=dim)

    def skip(self, key: str, reason: str, valid: Callable[[Tensor], bool] | None = None) -> None:
        """Deliberately leave ``key`` out of the import, for ``reason``.

        With ``valid``, the key is only skipped when ``valid(tensor)`` holds (e.g. a persisted
        RoPE table that matches what minivlm recomputes); otherwise it stays unmapped and is
        reported, because then it carries information minivlm would lose.
        """
        if key in self.foreign and (valid is None or valid(self.foreign[key])):
            self._used.add(key)
            self._skipped[key] = reason

    def skip_where(self, predicate: Callable[[str], bool], reason: str) -> None:
        """Deliberately leave out every not yet consumed key for which ``predicate(key)`` holds."""
        for key in self.foreign:
            if key not in self._used and predicate(key):
                self._used.add(key)
                self._skipped[key] = reason

    def result(self) -> MappedState:
        unmapped = [k for k in self.foreign if k not in self._used]
        by_reason: dict[str, list[str]] = {}
        for key, reason in self._skipped.items():
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in by_reason.items():
            shown = ", ".join(keys[:4]) + (f", ... ({len(keys) - 4} more)" if len(keys) > 4 else "")
            log.info("not importing %d key(s), %s: %s", len(keys), reason, shown)
        return MappedState(self.state, unmapped, list(dict.fromkeys(self._absent)), dict(self._skipped))


def tied_aliases(module: nn.Module) -> set[str]:
    """State-dict keys that are a second name of an earlier parameter (a tied LM head).

    Found by parameter identity, so it also works for modules built on the ``meta`` device.
    """
    first: dict[int, str] = {}
    aliases: set[str] = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases.add(name)
        else:
            first[id(param)] = name
    return aliases


def verify_mapped(mapped: MappedState, expected: Mapping[str, torch.Size], source: str,
                  tied: Iterable[str] = ()) -> None:
    """Check a mapping against the shapes a module expects; raise listing every problem.

    Args:
        mapped: the result of a mapping function.
        expected: module key -> shape (``{k: v.shape for k, v in module.state_dict().items()}``).
        source: a name for the error message (a path or a model name).
        tied: module keys that alias another parameter and so need no weights of their own.
    """
    tied = set(tied)
    state = mapped.state
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: source {list(state[k].shape)} vs model {list(expected[k])}"
                  for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k])]
    error = WeightMappingError(source, unmapped=mapped.unmapped, absent=mapped.absent, unexpected=unexpected,
                               missing=missing, mismatched=mismatched)
    if error.has_problems:
        raise error


def load_mapped(module: nn.Module, mapped: MappedState, source: str) -> nn.Module:
    """Verify ``mapped`` against ``module`` (see :func:`verify_mapped`) and copy the weights in.

    Tensors are cast to the module's dtypes; a tied head keeps pointing at the embedding.
    Returns ``module``.
    """
    own = module.state_dict()
    verify_mapped(mapped, {k: v.shape for k, v in own.items()}, source, tied_aliases(module))
    # strict=False only because tied aliases are absent from `mapped`; everything else was checked.
    module.load_state_dict(mapped.state, strict=False)
    return module
