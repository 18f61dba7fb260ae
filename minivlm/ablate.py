"""Architecture ablations: a grid of config variants, trained and evaluated under one budget.

A *grid* (YAML or JSON) names a base preset, the training data, a budget and the axes to sweep::

    name: projectors
    base: tiny
    data: shapes:0.5,easy_vqa_dialogues:0.5
    steps: 120                 # or  tokens: 2000000  (steps then follow each variant's tokens/step)
    eval_limit: 200
    seeds: 1                   # a count (seeds 0..N-1) or a list, e.g. [0, 1, 2]
    overrides: {train.batch_size: 16, train.lr: 1e-3}
    axes:
      projector: [linear, mlp, pixel_shuffle, resampler]
      fusion: [splice, cross_attention, prefix]

Axis keys are anything :func:`minivlm.config.apply_overrides` accepts: a part name sets its kind
(``projector: [...]``), dotted keys set fields (``encoder.feature_layer: [-1, -2]``,
``data.resize: [resize, letterbox]``, ``train.stage: [align, full]``).

Fairness: every variant of a seed trains on the same data in the same order from the same
initial RNG state, for the same number of steps (or, with ``tokens``, the same number of
training tokens), and is scored on the same test samples; a preset's wall-clock limit
(``train.max_minutes``) is switched off. Each run goes through :func:`minivlm.train.recipe.run`
into ``OUT/<variant>/seed_<s>/``, plus ``eval_loss.json`` and ``run_info.json`` (date, machine,
wall time).

Resumable: a run is finished when its ``eval.json`` exists and is then skipped; an unfinished
run continues from its newest checkpoint. A variant that raises is recorded (``error.json``,
and the message in the results) and the sweep moves on.

Output in ``OUT``: ``runs.csv`` (one row per run), ``results.csv`` and ``results.md`` (one row
per variant, mean and standard deviation over seeds), ``loss_curves.png``, ``metrics.png``, and
``grid.json`` + ``base_config.json`` (what the runs were made from; a later invocation with other
settings is refused rather than mixed in).
"""

from __future__ import annotations

import copy
import csv
import datetime
import itertools
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from minivlm.config import ConfigError, VLMConfig, apply_overrides, preset
from minivlm.io_atomic import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

GRID_FILE = "grid.json"
BASE_CONFIG_FILE = "base_config.json"  # the preset + data + overrides the runs were made from
EVAL_FILE = "eval.json"
EVAL_LOSS_FILE = "eval_loss.json"
ERROR_FILE = "error.json"
RUN_INFO_FILE = "run_info.json"  # when, where and how long a run took: tok/s mean little without it
#: Test samples per task for the teacher-forced evaluation loss when the grid sets no eval_limit.
DEFAULT_EVAL_LOSS_SAMPLES = 200
#: Training samples rendered to estimate tokens per step for a token budget.
TOKEN_ESTIMATE_SAMPLES = 256
#: Bar-chart panels drawn by default before falling back to the headline metrics only.
MAX_DEFAULT_PANELS = 9
#: Fraction of the final steps whose logged losses are averaged into "final train loss".
FINAL_LOSS_FRACTION = 0.1

_GRID_KEYS = ("name", "base", "data", "steps", "tokens", "eval_limit", "seeds", "overrides", "axes")
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
        """Short human label for plots: the values joined, e.g. ``mlp / splice``."""
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
        axes: ordered mapping ``key -> values``; the grid is their Cartesian product.
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
        return cls.from_dict(raw, str(path))

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
        """The Cartesian product of the axes, first axis slowest."""
        keys = list(self.axes)
        return [Variant(tuple(zip(keys, values, strict=True))) for values in itertools.product(*self.axes.values())]

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


# ---- running ----------------------------------------------------------------------------------


def run_dir_of(out_dir: str | Path, variant: Variant, seed: int) -> Path:
    return Path(out_dir) / variant.name / f"seed_{seed}"


def is_finished(run_dir: Path) -> bool:
    """A run is finished once the recipe wrote its evaluation."""
    return (run_dir / EVAL_FILE).is_file()


def check_output_dir(grid: AblationGrid, out_dir: Path) -> None:
    """Refuse to mix runs made under different settings in one directory (finished runs would
    be reused as if they had been made under the current ones).

    Axes and seeds may change between invocations (new variants simply run); the grid's base,
    data, budget and fixed overrides may not, nor may the base config they resolve to (a preset
    edited between invocations).
    """
    path = out_dir / GRID_FILE
    if not path.is_file():
        return
    previous = json.loads(path.read_text())
    current = grid.to_dict()
    changed = [f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in _BUDGET_KEYS
               if previous.get(k) != current.get(k)]
    base_path = out_dir / BASE_CONFIG_FILE
    if base_path.is_file():
        before, now = _flatten(json.loads(base_path.read_text())), _flatten(grid.base_config().to_dict())
        changed += [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
                    if before.get(k) != now.get(k)]
    if changed:
        raise GridError(f"{out_dir} holds runs of grid {previous.get('name')!r} made with other settings "
                        f"({'; '.join(changed)}); use another --out so finished runs are not reused")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; JSON lists compare as lists."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def estimate_tokens_per_step(cfg: VLMConfig, n_samples: int = TOKEN_ESTIMATE_SAMPLES,
                             tokenizer_cache: dict | None = None) -> float:
    """Mean training tokens (padding excluded, as the trainer counts them) per optimizer step.

    Renders the first ``n_samples`` training samples with the processor the recipe would build
    for ``cfg``; a variant's image tokens per image change this, its text does not.
    ``tokenizer_cache`` (a dict) shares trained tokenizers between variants of one grid.
    """
    from minivlm.data import build_dataset
    from minivlm.text.processor import SampleSkipped
    from minivlm.train.recipe import attach_tokenizer, build_processor, build_tokenizer

    data = build_dataset(cfg.data.mixture, "train", seed=cfg.train.seed, image_size=cfg.encoder.image_size)
    key = (cfg.data.mixture, cfg.decoder.vocab_size, cfg.train.seed)
    cache = tokenizer_cache if tokenizer_cache is not None else {}
    if key not in cache:
        cache[key] = build_tokenizer(data, cfg.decoder.vocab_size)
    tokenizer = cache[key]
    processor = build_processor(attach_tokenizer(copy.deepcopy(cfg), tokenizer), tokenizer)
    lengths = []
    for i in range(min(n_samples, len(data))):
        try:
            lengths.append(len(processor.render(data[i]["messages"]).input_ids))
        except SampleSkipped:
            continue
    if not lengths:
        raise GridError(f"none of the first {n_samples} samples of {cfg.data.mixture!r} renders within "
                        f"data.max_length={cfg.data.max_length}; cannot estimate tokens per step")
    t = cfg.train
    return statistics.fmean(lengths) * t.batch_size * t.grad_accum


def steps_for_tokens(tokens: int, tokens_per_step: float) -> int:
    """Steps that train on ``tokens`` tokens, at least 1."""
    return max(1, round(tokens / tokens_per_step))


@dataclass
class PlannedRun:
    variant: Variant
    seed: int
    run_dir: Path
    config: VLMConfig | None  # None when the variant's config is invalid
    error: str | None = None  # why config is None


def plan_runs(grid: AblationGrid, out_dir: str | Path) -> list[PlannedRun]:
    """Every (variant, seed) run with its config; invalid variants carry their error instead."""
    out_dir = Path(out_dir)
    tokenizers: dict = {}
    plans = []
    for variant in grid.variants():
        for seed in grid.seeds:
            run_dir = run_dir_of(out_dir, variant, seed)
            try:
                cfg = grid.variant_config(variant, seed)
                if grid.tokens is not None:
                    per_step = estimate_tokens_per_step(cfg, tokenizer_cache=tokenizers)
                    cfg.train.steps = steps_for_tokens(grid.tokens, per_step)
            except ValueError as err:  # ConfigError included: an invalid combination of axis values
                plans.append(PlannedRun(variant, seed, run_dir, None, f"{type(err).__name__}: {err}"))
                continue
            plans.append(PlannedRun(variant, seed, run_dir, cfg))
    return plans


@dataclass
class SweepOutcome:
    """What :func:`run_ablation` did. ``interrupted``: a signal stopped a run (re-run to resume)."""

    out_dir: Path
    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]
    interrupted: bool
    reports: dict[str, Path]


def run_ablation(grid: AblationGrid, out_dir: str | Path,
                 runner: Callable[..., Any] | None = None) -> SweepOutcome:
    """Train and evaluate every pending run of ``grid`` into ``out_dir``, then write the report.

    Args:
        grid: the grid.
        out_dir: the result directory (created).
        runner: the function that trains one run, ``runner(cfg, run_dir, resume=True,
            eval_limit=..., progress=False) -> RunOutputs``; :func:`minivlm.train.recipe.run` by
            default (tests substitute a failing one).

    Raises:
        GridError: ``out_dir`` holds runs made with other budget settings.
    """
    from minivlm.train.recipe import run as recipe_run

    runner = runner or recipe_run
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_output_dir(grid, out_dir)
    atomic_write_json(out_dir / GRID_FILE, grid.to_dict())
    atomic_write_text(out_dir / BASE_CONFIG_FILE, grid.base_config().to_json() + "\n")
    plans = plan_runs(grid, out_dir)
    ran, skipped, failed, interrupted = [], [], {}, False
    for index, plan in enumerate(plans, start=1):
        tag = f"{plan.variant.name}/seed_{plan.seed}"
        if is_finished(plan.run_dir):
            log.info("[%d/%d] %s: finished earlier, skipped", index, len(plans), tag)
            if not (plan.run_dir / EVAL_LOSS_FILE).is_file():  # stopped between evaluation and eval loss
                write_eval_loss(plan.run_dir, grid.eval_limit or DEFAULT_EVAL_LOSS_SAMPLES)
            skipped.append(tag)
            continue
        log.info("[%d/%d] %s: training %s steps", index, len(plans), tag,
                 plan.config.train.steps if plan.config else "-")
        status, error = _run_one(plan, grid, runner)
        if status == "interrupted":
            log.warning("%s was interrupted; its checkpoint is kept: run the same command again to resume", tag)
            interrupted = True
            break
        if status == "finished":
            ran.append(tag)
        else:
            failed[tag] = error
    reports = write_report(grid, out_dir)
    return SweepOutcome(out_dir, ran, skipped, failed, interrupted, reports)


def _run_one(plan: PlannedRun, grid: AblationGrid, runner: Callable[..., Any]) -> tuple[str, str]:
    """Run one plan; returns ``(status, error)``, status ``finished``, ``interrupted`` or ``failed``."""
    from minivlm.train.checkpoint import CHECKPOINTS_DIR, latest_checkpoint

    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    if plan.config is None:
        return "failed", _record_failure(run_dir, plan.error or "invalid configuration", None)
    if latest_checkpoint(run_dir) is None:
        # A run that died before its first checkpoint restarts from step 0: drop its log so the
        # new run's records do not follow stale ones.
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        out = runner(plan.config, run_dir, resume=True, eval_limit=grid.eval_limit, progress=False)
        if out.status == "interrupted":
            return "interrupted", ""
        write_eval_loss(run_dir, grid.eval_limit or DEFAULT_EVAL_LOSS_SAMPLES)
    except Exception as err:  # a failed variant must not end the sweep: record it and go on
        return "failed", _record_failure(run_dir, f"{type(err).__name__}: {err}", traceback.format_exc())
    atomic_write_text(run_dir / RUN_INFO_FILE, json.dumps({
        "finished": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_description(),
        # Of this invocation only: a resumed run's earlier part is not included.
        "wall_seconds": round(time.perf_counter() - started, 1)}) + "\n")
    # The final model is in model/; the training state only served resumption.
    shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    return "finished", ""


def _record_failure(run_dir: Path, message: str, trace: str | None) -> str:
    log.error("%s failed: %s", run_dir, message)
    atomic_write_json(run_dir / ERROR_FILE, {"error": message, "traceback": trace})
    return message


def write_eval_loss(run_dir: Path, limit: int) -> float:
    """Teacher-forced loss per supervised token on the first ``limit`` test samples of each task.

    Computed from ``run_dir/model`` and saved in ``eval_loss.json``. Exact-match accuracy moves
    in steps; this loss shows how close a short run came to the answers.
    """
    from minivlm.data import build_dataset
    from minivlm.data.collate import pad_collate
    from minivlm.model import VisionLanguageModel
    from minivlm.text.processor import SampleSkipped
    from minivlm.train.recipe import eval_sources

    model = VisionLanguageModel.from_pretrained(run_dir / "model")
    model.eval()
    cfg = model.config
    loss_sum, n_tokens = 0.0, 0
    with torch.no_grad():
        for name in eval_sources(cfg.data.mixture):
            data = build_dataset(name, "test", seed=cfg.train.seed, image_size=cfg.encoder.image_size)
            rendered = []
            for i in range(min(limit, len(data))):
                try:
                    rendered.append(model.processor.render(data[i]["messages"]))
                except SampleSkipped:
                    continue
            for start in range(0, len(rendered), 32):
                batch = pad_collate(rendered[start:start + 32], model.processor.tokenizer.pad_id)
                out = model(batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"],
                            attention_mask=batch["attention_mask"], return_logits=False)
                loss_sum += float(out.loss_sum)
                n_tokens += int(out.n_supervised)
    loss = loss_sum / max(n_tokens, 1)
    atomic_write_text(run_dir / EVAL_LOSS_FILE, json.dumps({"eval_loss": loss, "supervised_tokens": n_tokens}) + "\n")
    return loss


# ---- collecting -------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """One run's numbers (a row of ``runs.csv``). ``status``: finished | failed | pending."""

    variant: str
    seed: int
    status: str
    error: str = ""
    steps: int | None = None
    tokens_per_s: float | None = None
    final_loss: float | None = None
    eval_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # run_info.json: finished, machine, wall_seconds


def read_run(run_dir: Path, variant: str, seed: int) -> RunRecord:
    """The record of one run directory, whatever state it is in."""
    from minivlm.train.plot import read_metrics

    if (run_dir / ERROR_FILE).is_file():
        return RunRecord(variant, seed, "failed", json.loads((run_dir / ERROR_FILE).read_text())["error"])
    if not is_finished(run_dir):
        return RunRecord(variant, seed, "pending")
    evaluation = json.loads((run_dir / EVAL_FILE).read_text())
    train, _ = read_metrics(run_dir)
    curve = [(r["step"], r["loss"]) for r in train if r.get("loss") is not None]
    steps = int(evaluation.get("steps") or (curve[-1][0] if curve else 0))
    final = [loss for step, loss in curve if step > (1 - FINAL_LOSS_FRACTION) * steps] or [c[1] for c in curve[-1:]]
    rates = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    eval_loss = None
    if (run_dir / EVAL_LOSS_FILE).is_file():
        eval_loss = json.loads((run_dir / EVAL_LOSS_FILE).read_text())["eval_loss"]
    info = json.loads((run_dir / RUN_INFO_FILE).read_text()) if (run_dir / RUN_INFO_FILE).is_file() else {}
    return RunRecord(
        variant, seed, "finished", steps=steps,
        # The median step rate: robust to the odd step slowed by a checkpoint or a busy machine.
        tokens_per_s=statistics.median(rates) if rates else None,
        final_loss=statistics.fmean(final) if final else None, eval_loss=eval_loss,
        metrics=dict(evaluation["metrics"]), curve=curve, info=info)


@dataclass(frozen=True)
class VariantShape:
    """What a config costs: parameters, forward FLOPs of one image + ``text_tokens`` text
    tokens, tokens per image after the projector and in the text stream."""

    params: int
    flops_per_sample: int
    image_tokens: int
    image_seq_len: int


def variant_shape(cfg: VLMConfig, text_tokens: int = 64) -> VariantShape:
    """Measure a config on a frozen meta-device copy (no memory), as ``minivlm summary`` does.

    The copy is frozen because a view of a parameter taken under ``no_grad`` (the resampler
    expands its latents) still requires grad without a grad_fn, which the module tracker of
    ``FlopCounterMode`` rejects.
    """
    from minivlm.model import VisionLanguageModel
    from minivlm.registry import image_seq_len, image_tokens
    from minivlm.summary import count_flops

    with torch.device("meta"):
        model = VisionLanguageModel(cfg)
    model.requires_grad_(False)
    return VariantShape(model.num_parameters(), sum(count_flops(model, text_tokens).values()),
                        image_tokens(cfg), image_seq_len(cfg))


@dataclass
class VariantSummary:
    """One row of ``results.md``: a variant's shape (None when its config is invalid) and its runs."""

    variant: Variant
    shape: VariantShape | None
    runs: list[RunRecord]

    @property
    def finished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "finished"]

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.runs if r.status == "failed"]

    def stat(self, get: Callable[[RunRecord], float | None]) -> tuple[float, float] | None:
        """``(mean, std)`` of a per-run number over finished seeds (std 0 with one seed)."""
        values = [v for v in (get(r) for r in self.finished) if v is not None and math.isfinite(v)]
        if not values:
            return None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(grid: AblationGrid, out_dir: str | Path) -> list[VariantSummary]:
    """Read every run of ``grid`` in ``out_dir`` (finished, failed or pending) into summaries."""
    out_dir = Path(out_dir)
    summaries = []
    for variant in grid.variants():
        runs = [read_run(run_dir_of(out_dir, variant, s), variant.name, s) for s in grid.seeds]
        try:
            shape: VariantShape | None = variant_shape(
                _trained_config(out_dir, variant, grid) or grid.variant_config(variant, grid.seeds[0]))
        except ValueError:
            shape = None  # an invalid variant has no shape; its runs carry the error
        summaries.append(VariantSummary(variant, shape, runs))
    return summaries


def _trained_config(out_dir: Path, variant: Variant, grid: AblationGrid) -> VLMConfig | None:
    """The config a finished run saved (its vocabulary is the trained tokenizer's)."""
    for seed in grid.seeds:
        path = run_dir_of(out_dir, variant, seed) / "model" / "config.json"
        if path.is_file():
            return VLMConfig.from_json(path)
    return None


def headline_metrics(summaries: Sequence[VariantSummary]) -> list[str]:
    """Metrics of the main table: each task's overall accuracy and caption CIDEr, sorted."""
    names = {k for s in summaries for r in s.finished for k in r.metrics}
    return sorted(k for k in names if k.endswith("/accuracy") or k.endswith("/caption_cider"))


def detail_metrics(summaries: Sequence[VariantSummary]) -> list[str]:
    """The other metrics (per question type, BLEU), for the second table."""
    names = {k for s in summaries for r in s.finished for k in r.metrics}
    return sorted(names - set(headline_metrics(summaries)))


# ---- reporting --------------------------------------------------------------------------------


def _fmt(stat: tuple[float, float] | None, digits: int = 3, n_seeds: int = 1) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n_seeds > 1 else f"{mean:.{digits}f}"


def write_report(grid: AblationGrid, out_dir: str | Path) -> dict[str, Path]:
    """Write ``runs.csv``, ``results.csv``, ``results.md``, ``loss_curves.png`` and ``metrics.png``."""
    out_dir = Path(out_dir)
    summaries = collect(grid, out_dir)
    paths = {
        "runs_csv": _write_runs_csv(summaries, out_dir / "runs.csv"),
        "results_csv": _write_results_csv(grid, summaries, out_dir / "results.csv"),
        "results_md": out_dir / "results.md",
        "loss_curves": out_dir / "loss_curves.png",
        "metrics": out_dir / "metrics.png",
    }
    atomic_write_text(paths["results_md"], results_markdown(grid, summaries))
    for key, figure in (("loss_curves", loss_curves_figure(summaries)), ("metrics", metric_bars_figure(summaries))):
        with atomic_path(paths[key]) as tmp:
            figure.savefig(tmp, dpi=110, format="png")
    return paths


def _write_runs_csv(summaries: Sequence[VariantSummary], path: Path) -> Path:
    metrics = sorted({k for s in summaries for r in s.runs for k in r.metrics})
    fields = ["variant", "seed", "status", "steps", "tokens_per_s", "final_loss", "eval_loss"]
    info = ["finished", "wall_seconds", "machine"]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*fields, *metrics, *info, "error"])
        writer.writeheader()
        for s in summaries:
            for r in s.runs:
                writer.writerow({**{k: getattr(r, k) for k in fields}, **r.metrics,
                                 **{k: r.info.get(k) for k in info}, "error": r.error})
    return path


def _per_variant_columns(summaries: Sequence[VariantSummary]) -> list[tuple[str, Callable[[RunRecord], float | None]]]:
    columns: list[tuple[str, Callable[[RunRecord], float | None]]] = [
        ("tokens_per_s", lambda r: r.tokens_per_s),
        ("final_train_loss", lambda r: r.final_loss), ("eval_loss", lambda r: r.eval_loss),
    ]
    for name in headline_metrics(summaries) + detail_metrics(summaries):
        columns.append((name, lambda r, name=name: r.metrics.get(name)))
    return columns


def _write_results_csv(grid: AblationGrid, summaries: Sequence[VariantSummary], path: Path) -> Path:
    stats = _per_variant_columns(summaries)
    columns = ["variant", *grid.axes, "params", "flops_per_sample", "image_tokens", "image_seq_len",
               "finished_seeds", "failed_seeds"]
    for name, _ in stats:
        columns += [f"{name}_mean", f"{name}_std"]
    columns.append("errors")
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for s in summaries:
            row: dict[str, Any] = {"variant": s.variant.name, **{k: override_value(v) for k, v in s.variant.settings},
                                   **(asdict(s.shape) if s.shape else {}),
                                   "finished_seeds": len(s.finished), "failed_seeds": len(s.errors),
                                   "errors": " | ".join(s.errors)}
            for name, get in stats:
                stat = s.stat(get)
                row[f"{name}_mean"], row[f"{name}_std"] = stat if stat else (None, None)
            writer.writerow(row)
    return path


def machine_description() -> str:
    """Where the numbers were measured: CPU count or GPU, torch version, platform."""
    if torch.cuda.is_available():
        device = f"GPU {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU ({os.cpu_count()} cores, torch threads: {torch.get_num_threads()})"
    return f"{device}; torch {torch.__version__}; {platform.platform(terse=True)}"


def results_markdown(grid: AblationGrid, summaries: Sequence[VariantSummary]) -> str:
    """The report: settings, the main table (one row per variant) and per-question-type metrics."""
    n_seeds = len(grid.seeds)
    budget = (f"{grid.steps} steps" if grid.steps else f"{grid.tokens:,} training tokens" if grid.tokens
              else f"{grid.base_config().train.steps} steps (config)")
    lines = [
        f"# Ablation `{grid.name}`",
        "",
        _conditions_line(summaries),
        f"- base preset `{grid.base}`, data `{grid.base_config().data.mixture}`, budget {budget}, "
        f"seeds {list(grid.seeds)}, eval limit {grid.eval_limit or 'full test split'}",
        f"- fixed overrides: {', '.join(f'`{o}`' for o in grid.overrides) or 'none'}",
        "- GFLOP/sample: forward FLOPs of one image + 64 text tokens (`minivlm summary`); "
        "tok/s: median training step rate; train loss: mean logged loss over the last "
        f"{FINAL_LOSS_FRACTION:.0%} of steps; eval loss: teacher-forced loss per answer token on the test samples"
        + ("; values are mean ± std over seeds" if n_seeds > 1 else ""),
        "",
    ]
    headline = headline_metrics(summaries)
    axes = list(grid.axes) or ["variant"]
    header = [*axes, "params", "GFLOP/sample", "image tokens", "tok/s", "train loss", "eval loss", *headline, "runs"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for s in summaries:
        cells = [override_value(v) for _, v in s.variant.settings] or ["base"]
        cells += [
            *(_shape_cells(s.shape) if s.shape else ["-"] * 3),
            _fmt(s.stat(lambda r: r.tokens_per_s), 0, n_seeds),
            _fmt(s.stat(lambda r: r.final_loss), 3, n_seeds),
            _fmt(s.stat(lambda r: r.eval_loss), 3, n_seeds),
            *[_fmt(s.stat(lambda r, m=m: r.metrics.get(m)), 3, n_seeds) for m in headline],
            _runs_cell(s, n_seeds),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    detail = detail_metrics(summaries)
    if detail:
        lines += ["", "Per question type:", "", "| " + " | ".join([*axes, *detail]) + " |",
                  "|" + "|".join("---" for _ in [*axes, *detail]) + "|"]
        for s in summaries:
            cells = [override_value(v) for _, v in s.variant.settings] or ["base"]
            cells += [_fmt(s.stat(lambda r, m=m: r.metrics.get(m)), 3, n_seeds) for m in detail]
            lines.append("| " + " | ".join(cells) + " |")
    failures = [(s.variant.name, e) for s in summaries for e in s.errors]
    if failures:
        lines += ["", "Failed runs:", ""] + [f"- `{name}`: {error}" for name, error in failures]
    return "\n".join(lines) + "\n"


def _shape_cells(shape: VariantShape) -> list[str]:
    tokens = (f"{shape.image_tokens}" if shape.image_seq_len == shape.image_tokens
              else f"{shape.image_tokens} ({shape.image_seq_len} in text)")
    return [f"{shape.params / 1e6:.2f}M", f"{shape.flops_per_sample / 1e9:.3f}", tokens]


def _conditions_line(summaries: Sequence[VariantSummary]) -> str:
    """When and where the finished runs were made, and their total wall time."""
    infos = [r.info for s in summaries for r in s.finished if r.info]
    if not infos:
        return "- runs: none finished yet" if not any(s.finished for s in summaries) else "- runs: not recorded"
    dates = sorted(i["finished"][:10] for i in infos)
    when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    machines = "; ".join(sorted({i["machine"] for i in infos}))
    minutes = sum(i["wall_seconds"] for i in infos) / 60
    return f"- runs finished {when} on {machines}; {minutes:.0f} min of wall time for {len(infos)} runs"


def _runs_cell(s: VariantSummary, n_seeds: int) -> str:
    parts = [f"{len(s.finished)}/{n_seeds}"]
    if s.errors:
        parts.append(f"failed: {s.errors[0][:80]}")
    return " ".join(parts)


def _smoothed_mean_curve(runs: Sequence[RunRecord]) -> tuple[list[int], list[float]]:
    """Mean over seeds at the steps all of them logged, then a trailing moving mean."""
    from minivlm.train.plot import moving_mean

    common = sorted(set.intersection(*(set(step for step, _ in r.curve) for r in runs)))
    if not common:
        return [], []
    by_run = [dict(r.curve) for r in runs]
    mean = [statistics.fmean(d[step] for d in by_run) for step in common]
    return common, moving_mean(mean, max(1, len(mean) // 20))


def loss_curves_figure(summaries: Sequence[VariantSummary]):
    """Overlaid training-loss curves, one per variant (mean over seeds, lightly smoothed).

    Returns a matplotlib ``Figure`` (no pyplot state: safe in scripts, tests and notebooks).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for color, s in zip(_colors(len(summaries)), summaries, strict=True):
        runs = [r for r in s.finished if r.curve]
        if runs:
            steps, losses = _smoothed_mean_curve(runs)
            ax.plot(steps, losses, color=color, label=s.variant.label, linewidth=1.5)
    ax.set(xlabel="step", ylabel="training loss (per supervised token)", title="training loss")
    if ax.lines:
        ax.set_yscale("log")
        for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            set_formatter(FormatStrFormatter("%.2g"))  # 2, 3, 4 rather than 2x10^0 on a short log range
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def metric_bars_figure(summaries: Sequence[VariantSummary], metrics: Sequence[str] | None = None):
    """One horizontal bar chart per metric, error bars = std over seeds; returns a ``Figure``.

    ``metrics`` defaults to every metric plus ``eval_loss`` when that makes at most
    :data:`MAX_DEFAULT_PANELS` panels (per-question-type accuracy is where a blind model shows),
    else to the headline metrics plus ``eval_loss``.
    """
    from matplotlib.figure import Figure

    if metrics is None:
        every = headline_metrics(summaries) + detail_metrics(summaries) + ["eval_loss"]
        metrics = every if len(every) <= MAX_DEFAULT_PANELS else headline_metrics(summaries) + ["eval_loss"]
    names = list(metrics)
    cols = min(3, max(1, len(names)))
    rows = math.ceil(len(names) / cols) if names else 1
    fig = Figure(figsize=(4.2 * cols, 0.28 * len(summaries) * rows + 1.6 * rows))
    colors = _colors(len(summaries))
    labels = [s.variant.label for s in summaries]
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        get = (lambda r: r.eval_loss) if name == "eval_loss" else (lambda r, m=name: r.metrics.get(m))
        stats = [s.stat(get) for s in summaries]
        means = [st[0] if st else 0.0 for st in stats]
        errors = [st[1] if st else 0.0 for st in stats]
        ax.barh(range(len(summaries)), means, xerr=errors, color=colors, capsize=3)
        if name != "eval_loss":  # accuracies on a common 0..1 scale; CIDEr may exceed 1
            ax.set_xlim(0, max([1.0] + [m + e for m, e in zip(means, errors, strict=True)]))
        ax.set_yticks(range(len(summaries)), labels if i % cols == 0 else [""] * len(labels), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9)
        for y, st in enumerate(stats):
            if st is None:
                ax.text(0, y, " no result", va="center", fontsize=7, color="gray")
    if not names:
        fig.add_subplot().text(0.5, 0.5, "no finished runs yet", ha="center", va="center")
    fig.tight_layout()
    return fig


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def load_results(out_dir: str | Path) -> tuple[AblationGrid, list[VariantSummary]]:
    """The grid and per-variant summaries of an ablation directory (for notebooks)."""
    path = Path(out_dir) / GRID_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} is not an ablation result directory: {GRID_FILE} is missing")
    grid = AblationGrid.from_dict(json.loads(path.read_text()), str(path))
    return grid, collect(grid, out_dir)
