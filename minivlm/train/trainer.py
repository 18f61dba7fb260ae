"""The training loop: stages, mixed precision, accumulation, clipping, checkpoints, exact resume.

One global step = ``grad_accum`` micro-batches on each of ``world_size`` ranks. The loss of a
step is normalised by the supervised tokens of the *whole global batch*: each micro-batch
contributes ``loss_sum / N_global``, so a sample's weight does not depend on how many tokens
its micro-batch happened to hold (per-micro-batch means over-weight short batches). The
gradient of a step is therefore the gradient of one big batch's mean token loss, however it
is split across micro-batches and ranks. With ``train.loss_weighting`` other than ``token``,
tokens carry weights (:mod:`minivlm.train.loss_weighting`) and ``N_global`` is their total.
The step itself (micro-batches, the contrastive term, clipping, skipped steps) is
:mod:`minivlm.train.step`, checkpoints and exact resume are :mod:`minivlm.train.resume` (bit for
bit at a fixed ``train.cpu_threads``: parallel reductions round differently under another thread
count, and the measured choice depends on the machine); this module runs the loop around them.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Sampler

from minivlm.config import ConfigError, TrainConfig
from minivlm.model import VisionLanguageModel
from minivlm.text.processor import Processor
from minivlm.train import checkpoint as ckpt
from minivlm.train.contrastive import ContrastiveObjective, check_contrastive_config
from minivlm.train.data import CurriculumSampler, StepSampler, make_loader, step_sampler
from minivlm.train.distributed import DistributedContext
from minivlm.train.lora import apply_lora, has_lora, mark_only_lora_trainable
from minivlm.train.optim import build_optimizer
from minivlm.train.run_dir import RunDirectory, RunDirectoryError, collectively  # noqa: F401  (re-exported)
from minivlm.train.precision import grad_scaler, resolve_precision
from minivlm.train.stages import apply_stage, part_lr_scales
from minivlm.train.resume import CheckpointedRun
from minivlm.train.step import MODEL_INPUTS, OptimizerStep, TrainingAborted  # noqa: F401  (re-exported)
from minivlm.train.threads import ThreadTuner, available_cores, thread_candidates

log = logging.getLogger(__name__)



#: Steps timed before a time budget (``max_minutes``) fixes the schedule's length.
BUDGET_CALIBRATION_STEPS = 20


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did.

    ``status``: ``finished`` | ``interrupted`` (SIGTERM/SIGINT, number in ``stop_signal``; a
    checkpoint was saved) | ``time_budget`` | ``nonfinite`` (more than half of the run's steps
    were skipped for a non-finite loss or an fp16 overflow: the model did not really train).
    ``skipped_steps``: steps skipped for a non-finite loss or gradient;
    ``overflow_steps``: fp16 steps the gradient scaler skipped (normal while it calibrates).
    ``history``: one record per step of this call, as written to ``metrics.jsonl``.
    ``precision``: what ``train.precision`` resolved to (``auto`` -> bf16 or fp32, by device).
    """

    steps: int
    status: str
    final_loss: float
    seconds: float
    tokens_per_second: float
    skipped_steps: int
    skipped_samples: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    overflow_steps: int = 0
    stop_signal: int | None = None
    precision: str = "fp32"


def check_train_config(cfg: TrainConfig) -> None:
    """Reject settings the loop cannot run with, naming the field (``ConfigError``)."""

    def need(ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"train.{name}: expected {expected}, got {getattr(cfg, name)!r}")

    for name in ("batch_size", "grad_accum", "steps", "max_nonfinite", "log_every"):
        value = getattr(cfg, name)
        need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "an integer >= 1")
    for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints"):
        value = getattr(cfg, name)
        need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name, "an integer >= 0")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), "lr", "a finite number > 0")
    need(cfg.weight_decay >= 0, "weight_decay", "a number >= 0")
    need(cfg.grad_clip >= 0, "grad_clip", "a number >= 0 (0 disables clipping)")
    need(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", "a number in [0, 1]")
    need(len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas), "betas", "two numbers in [0, 1)")
    need(cfg.max_minutes is None or cfg.max_minutes > 0, "max_minutes", "None or a number > 0")
    need(isinstance(cfg.cpu_threads, int) and not isinstance(cfg.cpu_threads, bool) and cfg.cpu_threads >= 0,
         "cpu_threads", "an integer >= 0 (0: chosen by measurement)")
    rank = getattr(cfg, "lora_rank", 0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"train.lora_rank: expected an integer >= 0 (0 disables LoRA), got {rank!r}")


class Trainer(CheckpointedRun, OptimizerStep):
    """Trains a :class:`VisionLanguageModel` on a map-style dataset of chat samples.

    Args:
        model: the model (on CPU; moved to the context's device here). With ``train.lora_rank``
            > 0 it gets LoRA adapters (:mod:`minivlm.train.lora`) unless it already has some.
        processor: renders samples; saved with every checkpoint.
        dataset: map-style, sample ``i`` deterministic (see :mod:`minivlm.train.data`).
        run_dir: where checkpoints, ``metrics.jsonl`` and the final model go; a path (locked
            here, :mod:`minivlm.train.run_dir`) or a :class:`RunDirectory` its caller holds.
        eval_fn: ``eval_fn(model) -> dict of metrics``, called every ``train.eval_every`` steps.
        dist: the process group context (single process when None).
        progress: show a progress bar (rank 0 only).
        curriculum: one dataset per phase of ``data.curriculum`` (a single dataset for one phase),
            each trained on for its ``data.curriculum_steps`` before ``dataset``
            (:class:`~minivlm.train.data.CurriculumSampler`).

    Raises:
        ConfigError: invalid ``train.*`` settings.
        RunDirectoryError: ``run_dir`` cannot be written, or another process writes it
            (checked before anything else runs).
    """

    def __init__(self, model: VisionLanguageModel, processor: Processor, dataset: Dataset,
                 run_dir: str | Path | RunDirectory,
                 eval_fn: Callable[[VisionLanguageModel], dict[str, float]] | None = None,
                 dist: DistributedContext | None = None, progress: bool = True,
                 curriculum: Dataset | Sequence[Dataset] | None = None):
        self.cfg = model.config
        self.tcfg = self.cfg.train
        self.dist = dist or DistributedContext.single()
        self.device = self.dist.device
        # Every setting is checked before the first side effect (creating run_dir).
        check_train_config(self.tcfg)
        check_contrastive_config(self.tcfg, self.dist.world_size)
        self.contrastive = (ContrastiveObjective.from_config(self.tcfg, processor, self.cfg.encoder.image_size)
                            if self.tcfg.retrieval_weight else None)
        self.precision = resolve_precision(self.tcfg.precision, self.device)
        if self.dist.is_main:
            log.info("precision: %s%s", self.precision, " (train.precision=auto)" if self.tcfg.precision == "auto" else "")
        scales = part_lr_scales(self.tcfg)
        self.eval_fn = eval_fn
        self.progress = progress and self.dist.is_main
        self.run = self._acquire_run_dir(run_dir)
        self.run_dir = self.run.path
        self.model = model.to(self.device)
        self.model.processor = processor
        self.processor = processor
        self.dataset = dataset
        self.curriculum, self.curriculum_switches = self._plan_curriculum(curriculum)
        if self.contrastive is not None and getattr(self.model, "retrieval_head", None) is None:
            self.model.add_retrieval_head(ContrastiveObjective.head_config(self.tcfg))  # before the optimizer sees the model
        apply_stage(self.model, scales)
        self._setup_lora(scales)
        if self.tcfg.activation_checkpointing:
            self.model.decoder.gradient_checkpointing = True
        self.wrapped: nn.Module = self.dist.wrap(self.model, fsdp=self.tcfg.fsdp)
        self.forward_module = torch.compile(self.wrapped) if self.tcfg.compile else self.wrapped
        self.optimizer = build_optimizer(self.model, scales, self.tcfg, self.device)
        # The schedule is a pure function of (step, total_steps), both checkpointed: each step
        # sets ``lr = base_lr * multiplier`` itself (no LambdaLR, whose only state is the step
        # and which warns whenever a skipped step leaves optimizer.step() uncalled).
        for group in self.optimizer.param_groups:
            group["base_lr"] = group["lr"]
        self.total_steps = self.tcfg.steps
        self.scaler = grad_scaler(self.precision, self.device)
        self.step = 0
        self.data_seed = self.tcfg.seed
        self.nonfinite_total = 0
        self.overflow_total = 0
        self.skipped_samples: Counter = Counter()
        self._consecutive_bad = 0
        self._stop_signal: int | None = None
        self._saved_step: int | None = None
        self._filler: dict[str, Any] | None = None
        self.thread_tuner: ThreadTuner | None = None  # set by fit() on the CPU
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._tb = None  # opened by fit(), once the run directory is known to be this run's

    # ---- setup --------------------------------------------------------------------------------
    def _acquire_run_dir(self, run_dir: str | Path | RunDirectory) -> RunDirectory:
        """Lock the run directory (rank 0 writes it) before any compute. A :class:`RunDirectory`
        handed in stays its caller's to release; one taken here is released by :meth:`close`
        or when the trainer is garbage-collected."""
        self._owns_run = not isinstance(run_dir, RunDirectory)
        if not self._owns_run:
            return run_dir
        run = collectively(self.dist, lambda: RunDirectory.acquire(run_dir, writer=self.dist.is_main), run_dir)
        weakref.finalize(self, run.release)
        return run

    def close(self) -> None:
        """Release the run directory's lock if this trainer took it (the trainer stays readable)."""
        if self._owns_run:
            self.run.release()

    def _setup_lora(self, scales: dict[str, float]) -> None:
        """Add adapters when ``train.lora_rank`` asks for them; keep only adapters (and the
        projector / fusion, where the stage trains them) trainable on an adapted model."""
        rank = getattr(self.tcfg, "lora_rank", 0)
        train_projector, train_fusion = scales["projector"] > 0, scales["fusion"] > 0
        if rank and not has_lora(self.model):
            apply_lora(self.model, parts=tuple(getattr(self.tcfg, "lora_parts", ("decoder",))), r=rank,
                       alpha=getattr(self.tcfg, "lora_alpha", 16.0), train_projector=train_projector,
                       train_fusion=train_fusion)
        if has_lora(self.model):
            mark_only_lora_trainable(self.model, train_projector=train_projector, train_fusion=train_fusion)

    def _tensorboard(self):
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    # ---- signals --------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
            self._stop_signal = signum
            log.warning("received signal %d: saving a checkpoint after this step", signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: signals stay with whoever owns them
                pass
        return previous

    # ---- the loop --------------------------------------------------------------------------------
    def _fit_schedule_to_budget(self, elapsed: float, max_minutes: float, per_step: float, bar) -> None:
        """Shorten the schedule so its decay ends within the time budget.

        Measured once, over :data:`BUDGET_CALIBRATION_STEPS` steps of the main data (after a
        curriculum, whose steps may cost less): a run cut by the clock would otherwise stop at a
        high learning rate. ``total_steps`` is checkpointed, so a resumed run keeps the fitted
        schedule.
        """
        (remaining,) = self.dist.all_reduce_sums(max_minutes * 60 - elapsed)
        # Plan for 97% of what is left: step times jitter, and a checkpoint write takes time too.
        steps = self.step + int(0.97 * remaining / self.dist.world_size / per_step)
        if steps < self.total_steps:
            log.info("time budget %.1f min at %.2f s/step: schedule shortened from %d to %d steps",
                     max_minutes, per_step, self.total_steps, steps)
            self.total_steps = max(self.step + 1, steps)
            if bar is not None:
                bar.total = self.total_steps
                bar.refresh()

    @property
    def curriculum_steps(self) -> int:
        """Steps before the main data: where the last curriculum phase ends (0 without one)."""
        return self.curriculum_switches[-1] if self.curriculum_switches else 0

    def _plan_curriculum(self, curriculum: Dataset | Sequence[Dataset] | None) -> tuple[list[Dataset], list[int]]:
        """The curriculum's datasets still used and the steps where each next phase starts.

        All phases together take at most half the run, so a short run (``--steps 100``) keeps the
        recipe's proportions; the last phases are shortened (or dropped) first.
        """
        datasets = [] if curriculum is None else [curriculum] if isinstance(curriculum, Dataset) else list(curriculum)
        phases = self.cfg.data.curriculum_phases
        if not datasets:
            if phases and self.dist.is_main:
                # The caller chose the data (a notebook, a test): train on `dataset` alone.
                log.info("no curriculum datasets given: training on the main dataset only (data.curriculum ignored)")
            return [], []
        if len(datasets) != len(phases):
            raise ConfigError(f"data.curriculum: {len(phases)} phase(s) configured but {len(datasets)} curriculum "
                              f"dataset(s) given")
        budget, used, switches, start = self.tcfg.steps // 2, [], [], 0
        for dataset, (_, steps) in zip(datasets, phases):
            end = min(start + steps, budget)
            if end > start:
                used.append(dataset)
                switches.append(end)
                start = end
        if not used:
            raise ConfigError(f"data.curriculum needs train.steps >= 2 (it takes at most half the run); "
                              f"got train.steps={self.tcfg.steps}")
        return used, switches

    def _sampler_and_data(self) -> tuple[Sampler, Dataset]:
        """This rank's step sampler from the current step on, and the dataset it indexes."""
        t = self.tcfg

        def stream(data: Dataset, start: int, total: int | None) -> StepSampler:
            return step_sampler(data, t.batch_size, t.grad_accum, self.dist.world_size, self.dist.rank,
                                workers=self.cfg.data.num_workers, start_step=start, total_steps=total,
                                seed=self.data_seed)

        if not self.curriculum:
            return stream(self.dataset, self.step, self.total_steps), self.dataset
        datasets = [*self.curriculum, self.dataset]
        offsets = [0]
        for dataset in datasets[:-1]:
            offsets.append(offsets[-1] + len(dataset))
        sampler = CurriculumSampler([stream(d, 0, None) for d in datasets], self.curriculum_switches, offsets,
                                    start_step=self.step, total_steps=self.total_steps)
        return sampler, ConcatDataset(datasets)

    def fit(self, resume: bool | ckpt.IntactCheckpoint = False, max_minutes: float | None = None,
            overwrite: bool = False) -> TrainResult:
        """Train until ``train.steps``, a signal, or the time budget; see :class:`TrainResult`.

        ``resume``: continue the run of the directory from its newest intact checkpoint (or the
        one given). A new run (``resume=False``) refuses a directory holding another run unless
        ``overwrite`` (:meth:`RunDirectory.begin <minivlm.train.run_dir.RunDirectory.begin>`).

        Raises:
            TrainingAborted: ``train.max_nonfinite`` consecutive steps had a non-finite loss.
            RunDirectoryError: a new run into a directory that holds another run.
        """
        collectively(self.dist, lambda: self.run.begin(resume=bool(resume), overwrite=overwrite), self.run_dir)
        if self._tb is None:
            self._tb = self._tensorboard()
        if resume:
            self.resume(resume if isinstance(resume, ckpt.IntactCheckpoint) else None)
        max_minutes = max_minutes if max_minutes is not None else self.tcfg.max_minutes
        sampler, data = self._sampler_and_data()
        loader = make_loader(data, self.processor, sampler, packing=self.cfg.data.packing,
                             max_length=self.cfg.data.max_length, num_workers=self.cfg.data.num_workers,
                             seed=self.data_seed, loss_weighting=self.tcfg.loss_weighting)
        batches = iter(loader)
        previous_handlers = self._install_signal_handlers()
        history: list[dict[str, Any]] = []
        status, last_loss = "finished", float("nan")
        t_start, tokens_seen = time.perf_counter(), 0
        start_step = self.step
        calibrate_from = max(start_step, self.curriculum_steps)  # time the main data's steps
        t_calibrate = t_start
        bar = self._progress_bar()
        threads_before = torch.get_num_threads()
        self.thread_tuner = self._thread_tuner()
        self.model.train()
        try:
            while self.step < self.total_steps:
                threads = self.thread_tuner.threads_for_next_step() if self.thread_tuner else None
                t_step = time.perf_counter()
                record = self._train_step(batches)
                if self.thread_tuner is not None:
                    self.thread_tuner.record(time.perf_counter() - t_step)
                    record["threads"] = threads
                record["elapsed_s"] = time.perf_counter() - t_start
                if self.step == calibrate_from:
                    t_calibrate = time.perf_counter()
                if max_minutes is not None and self.step - calibrate_from == BUDGET_CALIBRATION_STEPS:
                    per_step = (time.perf_counter() - t_calibrate) / BUDGET_CALIBRATION_STEPS
                    self._fit_schedule_to_budget(record["elapsed_s"], max_minutes, per_step, bar)
                tokens_seen += record.pop("tokens")
                if record["loss"] is not None and "skipped" not in record:
                    last_loss = record["loss"]
                history.append(record)
                if self.step % self.tcfg.log_every == 0 or self.step == self.total_steps:
                    self._log(record)
                if bar is not None:
                    bar.update(1)
                    shown = record["loss"] if record["loss"] is not None else math.nan
                    bar.set_postfix(loss=f"{shown:.3f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                if self.eval_fn and self.tcfg.eval_every and self.step % self.tcfg.eval_every == 0:
                    self._evaluate()
                if self.tcfg.save_every and self.step % self.tcfg.save_every == 0:
                    self.save()
                out_of_time = max_minutes is not None and (time.perf_counter() - t_start) / 60 >= max_minutes
                stop, out_of_time = self.dist.any_rank(self._stop_signal is not None, out_of_time)
                if stop:
                    status = "interrupted"
                    break
                if out_of_time:
                    status = "time_budget"
                    break
            if (status == "interrupted" or self.tcfg.save_every) and self._saved_step != self.step:
                self.save()
        finally:
            torch.set_num_threads(threads_before)
            if bar is not None:
                bar.close()
            for sig, h in previous_handlers.items():
                signal.signal(sig, h)
            if self._tb is not None:
                self._tb.flush()
        seconds = time.perf_counter() - t_start
        if self.skipped_samples and self.dist.is_main:
            log.warning("skipped samples: %s", dict(self.skipped_samples))
        return TrainResult(self.step, self._final_status(status), last_loss, seconds,
                           tokens_seen / max(seconds, 1e-9), self.nonfinite_total, dict(self.skipped_samples), history,
                           self.overflow_total, self._stop_signal if status == "interrupted" else None,
                           self.precision)

    def _final_status(self, status: str) -> str:
        """``nonfinite`` when more than half of the run's steps so far (resumed parts included)
        were skipped as non-finite or fp16 overflows: such a run did not train, whatever its
        step count says."""
        bad = self.nonfinite_total + self.overflow_total
        if status == "interrupted" or 2 * bad <= self.step:
            return status
        if self.dist.is_main:
            log.error("%d of the %d steps of this run were skipped for a non-finite loss or gradient: the model "
                      "did not train (lower train.lr, or use train.precision=bf16 or fp32)", bad, self.step)
        return "nonfinite"

    def _thread_tuner(self) -> ThreadTuner | None:
        """On the CPU: ``train.cpu_threads`` threads, or (0) the count chosen by timing steps."""
        if self.device.type != "cpu":
            return None
        fixed = self.tcfg.cpu_threads
        return ThreadTuner((fixed,) if fixed else thread_candidates(available_cores()))

    # ---- reporting ------------------------------------------------------------------------------
    def _progress_bar(self):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, record["step"])
        log.debug("step %d loss %s lr %.2e", record["step"], record["loss"], record["lr"])

    def _evaluate(self) -> dict[str, float]:
        """``eval_fn`` on rank 0; on every rank under FSDP, whose forward passes are collectives."""
        self.model.eval()
        runs_here = self.dist.is_main or self.dist.strategy == "fsdp"
        try:
            with torch.no_grad():
                metrics = self.eval_fn(self.model) if runs_here else {}
        finally:
            self.model.train()
        if self.dist.is_main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps({"step": self.step, "eval": metrics}) + "\n")
            if self._tb is not None:
                for k, v in metrics.items():
                    self._tb.add_scalar(f"eval/{k}", v, self.step)
        return metrics
