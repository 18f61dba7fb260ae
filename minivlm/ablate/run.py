"""Running a grid: the output layout, budgets in steps or tokens, one run per variant and seed,
resumable, failures recorded."""

from __future__ import annotations

import copy
import datetime
import logging
import json
import shutil
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minivlm.ablate.grid import _BUDGET_KEYS, BASE_CONFIG_FILE, GRID_FILE, AblationGrid, GridError, Variant
from minivlm.ablate.report import write_report
from minivlm.ablate.reuse import copy_run, reusable_runs
from minivlm.ablate.results import (
    ERROR_FILE,
    EVAL_LOSS_FILE,
    RUN_INFO_FILE,
    is_finished,
    machine_description,
    run_dir_of,
)
from minivlm.config import VLMConfig
from minivlm.io_atomic import atomic_write_json, atomic_write_text
from minivlm.provenance import source_commit

log = logging.getLogger(__name__)


#: Test samples per task for the teacher-forced evaluation loss when the grid sets no eval_limit.
DEFAULT_EVAL_LOSS_SAMPLES = 200
#: Training samples rendered to estimate tokens per step for a token budget.
TOKEN_ESTIMATE_SAMPLES = 256


# ---- running ----------------------------------------------------------------------------------


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
    """Every (variant, seed) run with its config; invalid variants carry their error instead.

    Seed-major: every variant's first seed, then every variant's second, and so on, so a sweep
    stopped part-way already has a whole table (one seed) rather than a few variants with all;
    within a seed the baseline (:meth:`AblationGrid.baseline`) runs first, so whatever else has
    finished can be compared with it.
    """
    out_dir = Path(out_dir)
    tokenizers: dict = {}
    plans = []
    baseline = grid.baseline()
    order = [baseline] + [v for v in grid.variants() if v != baseline]
    for seed in grid.seeds:
        for variant in order:
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
    reused: list[str] = field(default_factory=list)  # copied from reuse_runs_from


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``; raises GridError naming the form expected."""
    index, sep, count = text.partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        shard = (-1, 0)
    if not sep or not 0 <= shard[0] < shard[1]:
        raise GridError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/2 and 1/2 for two processes")
    return shard


def run_ablation(grid: AblationGrid, out_dir: str | Path,
                 runner: Callable[..., Any] | None = None, shard: tuple[int, int] = (0, 1)) -> SweepOutcome:
    """Train and evaluate every pending run of ``grid`` into ``out_dir``, then write the report.

    Args:
        grid: the grid.
        out_dir: the result directory (created).
        runner: the function that trains one run, ``runner(cfg, run_dir, resume=True,
            eval_limit=..., progress=False) -> RunOutputs``; :func:`minivlm.train.recipe.run` by
            default (tests substitute a failing one).
        shard: ``(i, n)``: run only the plan's runs ``i, i + n, i + 2n, ...``, so ``n`` processes
            started with ``0..n-1`` share one sweep without running anything twice (e.g. two
            single-threaded processes on a 2-core machine). Each writes the report of every run
            finished so far when it ends.

    Raises:
        GridError: ``out_dir`` holds runs made with other budget settings.
    """
    from minivlm.train.recipe import run as recipe_run

    runner = runner or recipe_run
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_output_dir(grid, out_dir)
    plans, twins = assign_runs(grid, out_dir, shard)  # before writing anything: a bad source is refused
    atomic_write_json(out_dir / GRID_FILE, grid.to_dict())
    atomic_write_text(out_dir / BASE_CONFIG_FILE, grid.base_config().to_json() + "\n")
    reused = []
    for run_dir, twin in twins.items():
        if copy_run(twin, run_dir):
            log.info("%s: copied from %s (the same training)", run_dir, twin)
            reused.append(f"{run_dir.parent.name}/{run_dir.name}")
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
    return SweepOutcome(out_dir, ran, skipped, failed, interrupted, reports, reused)


def assign_runs(grid: AblationGrid, out_dir: str | Path, shard: tuple[int, int] = (0, 1)
                ) -> tuple[list[PlannedRun], dict[Path, Path]]:
    """The runs shard ``shard`` trains, and every run the grid copies from ``reuse_runs_from``
    (``{run_dir: its twin there}``, :func:`~minivlm.ablate.reuse.reusable_runs`).

    Shards deal out only the runs left to train, so a grid that copies some stays balanced.
    """
    plans = plan_runs(grid, out_dir)
    twins = reusable_runs(grid, plans, grid.reuse_runs_from) if grid.reuse_runs_from is not None else {}
    first, every = shard
    return [plan for plan in plans if plan.run_dir not in twins][first::every], twins


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
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_description(_training_threads(run_dir)),
        "code": source_commit(),  # the minivlm commit that trained it; None outside a git checkout
        # Of this invocation only: a resumed run's earlier part is not included.
        "wall_seconds": round(time.perf_counter() - started, 1)}) + "\n")
    # The final model is in model/; the training state only served resumption.
    shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    return "finished", ""


def _training_threads(run_dir: Path) -> int | None:
    """The torch threads of the run's last logged step (``metrics.jsonl``), if it logged them."""
    from minivlm.train.plot import read_metrics

    train, _ = read_metrics(run_dir)
    return next((int(r["threads"]) for r in reversed(train) if r.get("threads")), None)


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
