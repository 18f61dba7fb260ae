"""Collecting a sweep's results: one record per run, one summary per variant (mean and spread
over seeds), and what each variant costs (parameters, FLOPs, image tokens)."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from minivlm.ablate.grid import AblationGrid, Variant
from minivlm.config import VLMConfig


EVAL_FILE = "eval.json"
EVAL_LOSS_FILE = "eval_loss.json"
ERROR_FILE = "error.json"
RUN_INFO_FILE = "run_info.json"  # when, where and how long a run took: tok/s mean little without it
REUSED_FILE = "reused.json"  # a run copied from another sweep: where from (minivlm.ablate.reuse)

#: Fraction of the final steps whose logged losses are averaged into "final train loss".
FINAL_LOSS_FRACTION = 0.1


# ---- collecting -------------------------------------------------------------------------------


def run_dir_of(out_dir: str | Path, variant: Variant, seed: int) -> Path:
    return Path(out_dir) / variant.name / f"seed_{seed}"


def is_finished(run_dir: Path) -> bool:
    """A run is finished once the recipe wrote its evaluation."""
    return (run_dir / EVAL_FILE).is_file()


def machine_description(threads: int | None = None) -> str:
    """Where the numbers were measured: CPU count or GPU, torch version, platform; on the CPU also
    the torch threads a run trained with (``threads``; the trainer sets them for the run only, so
    the process's count afterwards says nothing)."""
    if torch.cuda.is_available():
        device = f"GPU {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU ({os.cpu_count()} cores" + (f", {threads} torch thread{'s' * (threads != 1)} per run)"
                                                  if threads else ")")
    return f"{device}; torch {torch.__version__}; {platform.platform(terse=True)}"


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
    counts: dict[str, int] = field(default_factory=dict)  # how many evaluated items each metric averages
    curve: list[tuple[int, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # run_info.json: finished, machine, wall_seconds
    train_seconds: float | None = None  # training, every invocation of a resumed run included
    eval_seconds: float | None = None

    @property
    def seconds(self) -> float | None:
        """Training plus evaluation: what the run cost, however many times it was resumed."""
        if self.train_seconds is None:
            return None
        return self.train_seconds + (self.eval_seconds or 0.0)


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
    if (run_dir / REUSED_FILE).is_file():  # copied from another sweep (minivlm.ablate.reuse)
        info["reused_from"] = json.loads((run_dir / REUSED_FILE).read_text())["from"]
    return RunRecord(
        variant, seed, "finished", steps=steps,
        # The median step rate: robust to the odd step slowed by a checkpoint or a busy machine.
        tokens_per_s=statistics.median(rates) if rates else None,
        final_loss=statistics.fmean(final) if final else None, eval_loss=eval_loss,
        metrics=dict(evaluation["metrics"]), counts=dict(evaluation.get("counts") or {}), curve=curve, info=info,
        train_seconds=training_seconds(train), eval_seconds=evaluation.get("seconds"))


def training_seconds(records: Sequence[dict[str, Any]]) -> float | None:
    """Training time over every invocation of a run, from its log's ``elapsed_s``.

    Each invocation's clock starts again at 0 when a run resumes, so the log is cut where
    ``elapsed_s`` goes down and each piece's last value is added (work a crash threw away
    counts too: it was time spent).
    """
    total, last = 0.0, None
    for record in records:
        elapsed = record.get("elapsed_s")
        if elapsed is None:
            continue
        if last is not None and elapsed < last:
            total += last
        last = elapsed
    return None if last is None else total + last


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


class SeedStat(NamedTuple):
    """A number over seeds: ``mean``, sample ``std`` (0 for one seed) and ``n`` seeds.

    ``se`` is the standard error of the mean, ``std / sqrt(n)``: the error bar of the tables and
    plots, since the question is how well the mean is known, not how much one seed varies.
    """

    mean: float
    std: float
    n: int

    @property
    def se(self) -> float:
        return self.std / math.sqrt(self.n)


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

    def stat(self, get: Callable[[RunRecord], float | None]) -> SeedStat | None:
        """Mean, sample standard deviation and count of a per-run number over finished seeds."""
        values = [v for v in (get(r) for r in self.finished) if v is not None and math.isfinite(v)]
        if not values:
            return None
        return SeedStat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))

    def fewest_items(self, metric: str) -> int | None:
        """The fewest evaluated items behind ``metric`` in any finished run (None when not recorded)."""
        counts = [r.counts[metric] for r in self.finished if r.counts.get(metric)]
        return min(counts) if counts else None


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
