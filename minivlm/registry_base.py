"""An exact-key table of named builders: what every registry in minivlm is (the model's parts,
chat templates, image processors).

Lookup is exact: ``"mlp"`` never matches ``"mof_mlp"`` (a prefix or substring match is how a typo
silently builds the wrong thing). This module imports nothing from the package, so any layer may
hold a registry.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of builders for one kind of thing (e.g. ``PROJECTORS``)."""

    def __init__(self, part: str, builtins: dict[str, T] | None = None):
        self.part = part
        self._table: dict[str, T] = {}
        for name, obj in (builtins or {}).items():
            self.register(name, obj)

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Add ``obj`` under ``name``; without ``obj``, a decorator that does.

        Raises:
            ValueError: ``name`` is taken.
        """
        def add(obj: T) -> T:
            if name in self._table:
                raise ValueError(f"{self.part} {name!r} is registered twice")
            self._table[name] = obj
            return obj

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (e.g. a variant a test registered); unknown names are an error."""
        self.get(name)
        del self._table[name]

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
