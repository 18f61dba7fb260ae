"""Exact-key registries for the four swappable parts.

A registry maps a config's ``kind`` string to the class that builds it. Lookup is exact:
``"mlp"`` never matches ``"mof_mlp"`` (a prefix or substring match is how a typo silently builds
the wrong model). Adding a variant is one file plus one ``@REGISTRY.register("name")`` line.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of builders for one part of the model (e.g. ``PROJECTORS``)."""

    def __init__(self, part: str):
        self.part = part
        self._table: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._table:
                raise ValueError(f"{self.part} {name!r} is registered twice")
            self._table[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._table[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.part} {name!r}; expected one of {sorted(self._table)}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._table

    def names(self) -> list[str]:
        return sorted(self._table)


ENCODERS: Registry = Registry("encoder")
PROJECTORS: Registry = Registry("projector")
FUSIONS: Registry = Registry("fusion")
DECODERS: Registry = Registry("decoder")
