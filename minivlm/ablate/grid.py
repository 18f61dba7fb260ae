"""The ablation grid: its file format, the variants it expands to, and each run's config."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from minivlm.config import ConfigError, VLMConfig, apply_overrides, preset


GRID_FILE = "grid.json"
BASE_CONFIG_FILE = "base_config.json"  # the preset + data + overrides the runs were made from
_GRID_KEYS = ("name", "base", "data", "steps", "tokens", "eval_limit", "seeds", "overrides", "axes", "design",
              "reuse_runs_from")
#: How axes make variants: every combination, or the base plus each value changed on its own.
DESIGNS = ("product", "one_at_a_time")
_BUDGET_KEYS = ("base", "data", "steps", "tokens", "eval_limit", "overrides")


class GridError(ConfigError):
    """An ablation grid file or grid option that cannot be run; the message names the key."""


# ---- the grid ---------------------------------------------------------------------------------


def override_value(value: Any) -> str:
    """A grid value as the string :func:`~minivlm.config.apply_overrides` parses.

    YAML reads ``1e-3`` as a string and ``true`` as a bool; both end up as the field's own type.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


@dataclass(frozen=True)
class Variant:
    """One point of the grid: ``settings`` is ``((axis key, value), ...)`` in axis order."""

    settings: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        """Directory-safe name, e.g. ``projector=mlp__fusion=splice`` (``base`` without axes)."""
        if not self.settings:
            return "base"
        parts = [f"{key}={override_value(value)}" for key, value in self.settings]
        return re.sub(r"[^A-Za-z0-9._=+-]", "_", "__".join(parts))

    @property
    def label(self) -> str:
        """Short human label for plots and findings: the values joined, e.g. ``mlp / splice``; a
        variant that changes one setting names it (``stem=patch``, ``temporal_patch_size=1``), as
        in a one-at-a-time grid a bare value (``1``) would not say which axis moved."""
        if len(self.settings) == 1:
            key, value = self.settings[0]
            return f"{key.rsplit('.', 1)[-1]}={override_value(value)}"
        return " / ".join(override_value(v) for _, v in self.settings) or "base"

    def overrides(self) -> list[str]:
        return [f"{key}={override_value(value)}" for key, value in self.settings]


@dataclass
class AblationGrid:
    """A parsed grid file; see the module docstring for the format.

    Attributes:
        name: used for the default output directory ``runs/ablations/<name>``.
        base: preset name every variant starts from.
        data: training mixture spec (``cfg.data.mixture``); None keeps the preset's.
        steps / tokens: the budget; at most one. Neither: the config's ``train.steps``.
        eval_limit: test samples per task (easy-VQA; synthetic tasks are capped at 200 by the
            recipe), also used for the evaluation loss.
        seeds: the seeds each variant runs with.
        overrides: ``key=value`` assignments applied to every variant before its axes.
        axes: ordered mapping ``key -> values``.
        design: ``product`` (default): the variants are the axes' Cartesian product.
            ``one_at_a_time``: the base config (variant ``base``) plus one variant per axis value
            that differs from the base, every other setting left as the base has it (the design
            of Karamcheti et al. 2024, "Prismatic VLMs", for axes too many to cross).
        reuse_runs_from: another sweep's output directory (relative to the grid file): its
            finished runs that train exactly as one of this grid's are copied, not trained again
            (:mod:`minivlm.ablate.reuse`), e.g. a shared baseline.
    """

    name: str
    base: str = "tiny"
    data: str | None = None
    steps: int | None = None
    tokens: int | None = None
    eval_limit: int | None = None
    seeds: tuple[int, ...] = (0,)
    overrides: tuple[str, ...] = ()
    axes: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    design: str = "product"
    reuse_runs_from: str | None = None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Any, source: str = "grid") -> AblationGrid:
        """Parse and check a grid mapping; every problem raises :class:`GridError`."""
        if not isinstance(raw, dict):
            raise GridError(f"{source}: expected a mapping of {list(_GRID_KEYS)}, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_GRID_KEYS))
        if unknown:
            raise GridError(f"{source}: unknown key(s) {unknown}; expected some of {list(_GRID_KEYS)}")
        grid = cls(
            name=str(raw.get("name") or Path(source).stem),
            base=str(raw.get("base", "tiny")),
            data=None if raw.get("data") is None else str(raw["data"]),
            steps=_optional_positive_int(raw.get("steps"), "steps", source),
            tokens=_optional_positive_int(raw.get("tokens"), "tokens", source),
            eval_limit=_optional_positive_int(raw.get("eval_limit"), "eval_limit", source),
            seeds=_parse_seeds(raw.get("seeds", 1), source),
            overrides=_parse_overrides(raw.get("overrides"), source),
            axes=_parse_axes(raw.get("axes"), source),
            design=str(raw.get("design", "product")),
            reuse_runs_from=None if raw.get("reuse_runs_from") is None else str(raw["reuse_runs_from"]),
        )
        grid.check()
        return grid

    @classmethod
    def load(cls, path: str | Path) -> AblationGrid:
        """Read a ``.yaml`` / ``.yml`` / ``.json`` grid file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"grid file {path} does not exist")
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise GridError(f"{path}: not valid YAML: {err}") from None
        elif path.suffix.lower() == ".json":
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as err:
                raise GridError(f"{path}: not valid JSON: {err}") from None
        else:
            raise GridError(f"{path}: expected a .yaml, .yml or .json grid file, got {path.suffix or 'no suffix'!r}")
        grid = cls.from_dict(raw, str(path))
        if grid.reuse_runs_from is not None and not Path(grid.reuse_runs_from).is_absolute():
            grid.reuse_runs_from = str(path.parent / grid.reuse_runs_from)  # as written in the file: beside it
        return grid

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        d["overrides"] = list(self.overrides)
        d["axes"] = {k: list(v) for k, v in self.axes.items()}
        return d

    def with_axes(self, assignments: Sequence[str]) -> AblationGrid:
        """A copy with ``key=a,b,c`` command-line axes added (replacing an axis of the same key)."""
        axes = dict(self.axes)
        for item in assignments:
            key, sep, values = item.partition("=")
            if not sep or not key.strip() or not values.strip():
                raise GridError(f"--grid {item!r}: expected key=value1,value2,..., e.g. projector=linear,mlp")
            axes[key.strip()] = tuple(v.strip() for v in values.split(","))
        grid = replace(self, axes=axes)
        grid.check()
        return grid

    def with_seeds(self, n: int) -> AblationGrid:
        """A copy running seeds ``0 .. n-1``."""
        return replace(self, seeds=_parse_seeds(n, "--seeds"))

    def with_budget(self, steps: int | None = None, eval_limit: int | None = None) -> AblationGrid:
        """A copy with another step budget (replacing a token budget) and/or evaluation limit."""
        changes: dict[str, Any] = {}
        if steps is not None:
            changes.update(steps=_optional_positive_int(steps, "steps", "--steps"), tokens=None)
        if eval_limit is not None:
            changes["eval_limit"] = _optional_positive_int(eval_limit, "eval_limit", "--eval-limit")
        return replace(self, **changes)

    def check(self) -> None:
        """Fail early (before hours of training) on a bad preset, override or axis value."""
        if self.steps is not None and self.tokens is not None:
            raise GridError(f"grid {self.name!r}: give one budget, steps ({self.steps}) or tokens "
                            f"({self.tokens}), not both")
        if self.design not in DESIGNS:
            raise GridError(f"grid {self.name!r}: design must be one of {' | '.join(DESIGNS)}, got {self.design!r}")
        cfg = self.base_config()
        for key, values in self.axes.items():
            for value in values:
                try:
                    apply_overrides(cfg, [f"{key}={override_value(value)}"])
                except ConfigError as err:
                    raise GridError(f"grid {self.name!r}, axis {key!r}, value {value!r}: {err}") from None

    # ---- expansion ----------------------------------------------------------------------------
    def base_config(self) -> VLMConfig:
        """The preset with the grid's data and fixed overrides applied (no axes, no budget)."""
        try:
            cfg = preset(self.base)
            if self.data is not None:
                cfg.data.mixture = self.data
            return apply_overrides(cfg, list(self.overrides))
        except ConfigError as err:
            raise GridError(f"grid {self.name!r}: {err}") from None

    def variants(self) -> list[Variant]:
        """``product``: the Cartesian product of the axes, first axis slowest. ``one_at_a_time``:
        ``base`` first, then each axis value the base does not already have, in file order."""
        keys = list(self.axes)
        if self.design == "product":
            return [Variant(tuple(zip(keys, values, strict=True))) for values in itertools.product(*self.axes.values())]
        return [Variant(())] + [Variant(((key, value),)) for key, values in self.axes.items() for value in values
                                if not self._is_base(Variant(((key, value),)))]

    def baseline(self) -> Variant:
        """The variant every other is compared with: the one whose config is the base config
        (``base`` in a one-at-a-time grid; e.g. the preset's own projector and fusion in a
        product grid), else the first variant."""
        variants = self.variants()
        return next((v for v in variants if self._is_base(v)), variants[0])

    def _is_base(self, variant: Variant) -> bool:
        base = self.base_config()
        return apply_overrides(self.base_config(), variant.overrides()) == base

    def variant_config(self, variant: Variant, seed: int) -> VLMConfig:
        """The full config of one run. Raises ConfigError for an invalid combination."""
        cfg = apply_overrides(self.base_config(), variant.overrides())
        cfg.train.seed = seed
        if self.steps is not None:
            cfg.train.steps = self.steps
        # The budget is steps or tokens: a wall-clock limit (a preset's max_minutes) would give
        # slower variants fewer steps, and its cut-off would move with the machine's load.
        cfg.train.max_minutes = None
        cfg.name = f"{self.name}/{variant.name}"
        from minivlm.registry import validate_config

        return validate_config(cfg)


def _optional_positive_int(value: Any, key: str, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # YAML/JSON 2e6
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GridError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _parse_seeds(value: Any, source: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise GridError(f"{source}: seeds must be a count >= 1 or a list of integers, got {value}")
        return tuple(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if len(set(value)) != len(value):
            raise GridError(f"{source}: seeds repeat a value: {value}")
        return tuple(value)
    raise GridError(f"{source}: seeds must be a count >= 1 or a non-empty list of integers, got {value!r}")


def _parse_overrides(value: Any, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, dict):
        return tuple(f"{k}={override_value(v)}" for k, v in value.items())
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return tuple(value)
    raise GridError(f"{source}: overrides must be a mapping (train.lr: 1e-3) or a list of 'key=value' strings, "
                    f"got {value!r}")


def _parse_axes(value: Any, source: str) -> dict[str, tuple[Any, ...]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GridError(f"{source}: axes must be a mapping of config key -> list of values, got {type(value).__name__}")
    axes: dict[str, tuple[Any, ...]] = {}
    for key, values in value.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"{source}: axis {key!r} must be a non-empty list of values, got {values!r}")
        if len({override_value(v) for v in values}) != len(values):
            raise GridError(f"{source}: axis {key!r} repeats a value: {values}")
        axes[str(key)] = tuple(values)
    return axes
