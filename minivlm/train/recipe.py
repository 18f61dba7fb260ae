"""The main job: build tokenizer, processor and model from a config, train, evaluate, report.

``minivlm train`` calls :func:`run`. Everything a later ``minivlm chat`` or ``from_pretrained``
needs ends up in ``runs/<name>/model/``; ``metrics.jsonl``, ``loss.png``, ``eval.json`` and
``train_result.json`` sit beside it, each written atomically (:mod:`minivlm.io_atomic`). The run
directory is locked and owned by the run for the whole call (:mod:`minivlm.train.run_dir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minivlm.config import ConfigError, VLMConfig
from minivlm.data import build_dataset
from minivlm.data.registry import parse_spec
from minivlm.model import VisionLanguageModel
from minivlm.registry import image_seq_len, validate_config
from minivlm.text.processor import Processor
from minivlm.text.tokenizer import Tokenizer
from minivlm.vision import ImageProcessor, ImageProcessorConfig

log = logging.getLogger(__name__)

#: Evaluation samples per synthetic task (easy-VQA is always scored on its full test split).
SYNTHETIC_EVAL_SAMPLES = 200


def template_texts(sample: dict[str, Any]) -> list[str]:
    """The text segments the chat template will encode for ``sample`` (role headers included).

    Training the tokenizer on exactly these strings makes ``"assistant\\n"`` or ``"\\n"`` single
    tokens instead of byte-fallback pieces: shorter sequences, faster training.
    """
    from minivlm.text.chat import TextSegment, chat_segments, normalize_messages

    segments = chat_segments(normalize_messages(sample["messages"]))
    return [seg.text for seg in segments if isinstance(seg, TextSegment)]


def build_tokenizer(dataset, vocab_size: int, n_samples: int = 3000, max_tiles: int = 0) -> Tokenizer:
    """Train a BPE tokenizer on the template text of ``n_samples`` samples spread over ``dataset``."""
    n = min(n_samples, len(dataset))
    stride = max(1, len(dataset) // n)
    items = [dataset[i] for i in range(0, n * stride, stride)]
    samples = [s for item in items for s in (item if isinstance(item, list) else [item])]  # groups: every member
    corpus = [t for sample in samples for t in template_texts(sample)]
    return Tokenizer.train(corpus, vocab_size=vocab_size, max_tiles=max_tiles)


def build_processor(cfg: VLMConfig, tokenizer: Tokenizer) -> Processor:
    image_cfg = ImageProcessorConfig(image_size=cfg.encoder.image_size, resize=cfg.data.resize,
                                     normalization=cfg.encoder.normalization, split_image=cfg.data.split_image)
    return Processor(tokenizer, ImageProcessor(image_cfg), image_seq_len(cfg), max_length=cfg.data.max_length,
                     video_max_frames=cfg.data.video_frames, temporal_patch_size=cfg.encoder.temporal_patch_size,
                     strict=cfg.data.strict)


def attach_tokenizer(cfg: VLMConfig, tokenizer: Tokenizer) -> VLMConfig:
    """The decoder's vocabulary and image placeholder id follow the tokenizer."""
    cfg.decoder.vocab_size = tokenizer.vocab_size
    cfg.image_token_id = tokenizer.image_token_id
    return cfg


def init_parts_from(model: VisionLanguageModel) -> None:
    """Initialise each part whose config names ``init_from`` (a part directory or checkpoint).

    Done once, for a fresh model: a resumed run or ``from_pretrained`` must not re-read sources.
    """
    from minivlm.interop.convert import load_part_weights
    from minivlm.model import PARTS

    for name in PARTS:
        source = getattr(model.config, name).init_from
        if source:
            load_part_weights(model, name, source)
            log.info("initialised %s from %s", name, source)


@dataclass
class RunOutputs:
    """What :func:`run` did. ``status`` is :class:`~minivlm.train.trainer.TrainResult`'s;
    ``not_evaluated``: training sources without a test split (file data), left unscored."""

    run_dir: Path
    model_dir: Path
    train_seconds: float
    status: str
    steps: int
    report: Any = None  # the EvalReport (None when interrupted or non-finite, and on ranks other than 0)
    not_evaluated: list[str] = field(default_factory=list)
    stop_signal: int | None = None
    skipped_steps: int = 0

    @property
    def metrics(self) -> dict[str, float]:
        return self.report.metrics if self.report is not None else {}

    @property
    def eval_seconds(self) -> float:
        return self.report.seconds if self.report is not None else 0.0


#: Training-only views of a dataset are scored on the dataset's standard test form.
EVAL_FORM = {"easy_vqa_dialogues": "easy_vqa", "easy_vqa_grouped": "easy_vqa", "easy_vqa_open": "easy_vqa",
             "easy_vqa_shape": "easy_vqa", "easy_vqa_color": "easy_vqa", "shapes_grouped": "shapes",
             "shapes_grouped_drawn_counts": "shapes",
             "charts_grouped": "charts", "multi_image_grouped": "multi_image"}


def eval_sources(spec: str) -> list[str]:
    """Named (non-file) datasets of a training spec, in their test form: those have a test split."""
    names = [EVAL_FORM.get(s.name, s.name) for s in parse_spec(spec) if s.path is None]
    return list(dict.fromkeys(names))


def unevaluated_sources(spec: str) -> list[str]:
    """File sources of a training spec (``jsonl:train.jsonl``): no test split, so not scored."""
    return [s.label for s in parse_spec(spec) if s.path is not None]


#: Settings a resumed run may change: they decide what is logged, kept or timed, not what is
#: computed, so the resumed run still continues the same optimisation.
RESUME_SAFE_FIELDS = frozenset({"train.log_every", "train.save_every", "train.keep_checkpoints", "train.eval_every",
                                "train.max_minutes", "train.cpu_threads", "train.max_nonfinite", "data.num_workers"})


def config_changes(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``[(dotted field, old value, new value)]`` where two configs differ."""
    changes = []
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(a):
            changes += config_changes(a, b, f"{prefix}{f.name}.")
        elif a != b:
            changes.append((f"{prefix}{f.name}", a, b))
    return changes


def resume_config(checkpoint_cfg: VLMConfig, overrides: list[str] | tuple[str, ...] = ()) -> VLMConfig:
    """The config a resumed run trains with: the checkpoint's, plus the ``overrides`` the user
    gave explicitly, which may only touch :data:`RESUME_SAFE_FIELDS` (applied and logged).

    Raises:
        ConfigError: an override would change the optimisation (``train.lr``, ``train.steps``,
            the data, the model, ...): a resumed run could not honour it. Every one is named.
    """
    requested = checkpoint_cfg.override(*overrides)
    changes = config_changes(checkpoint_cfg, requested)
    refused = [c for c in changes if c[0] not in RESUME_SAFE_FIELDS]
    if refused:
        listed = ", ".join(f"{name} from {a!r} to {b!r}" for name, a, b in refused)
        raise ConfigError(f"--resume continues the checkpoint's run and cannot change {listed}; drop these "
                          f"settings, or start a new run with them (--overwrite, or another --out)")
    for name, a, b in changes:
        log.warning("resuming with %s changed from %r to %r", name, a, b)
    return requested


def run(cfg: VLMConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
        overrides: list[str] | tuple[str, ...] = (), max_minutes: float | None = None, eval_limit: int | None = None,
        progress: bool = True, dist=None, base: str | Path | None = None) -> RunOutputs:
    """Train ``cfg`` into ``run_dir`` and evaluate the result on every named source's test split.

    ``base``: a checkpoint directory (e.g. written by ``minivlm import``) to fine-tune: its weights
    and processor (tokenizer, image processing, chat template) are used instead of a new tokenizer
    and random weights; ``cfg`` must be its config (with any overrides).

    ``run_dir`` is locked for the whole call. A new run refuses a directory that holds another
    run unless ``overwrite``; ``resume`` continues the directory's run from its newest intact
    checkpoint, with the checkpoint's config plus the explicit ``overrides`` it can honour
    (:func:`resume_config`; without a checkpoint, ``cfg`` starts the run).

    Raises:
        RunDirectoryError: the directory is locked by another process, not writable, or holds
            another run.
        ConfigError: an override a resumed run cannot apply.
        CheckpointError: checkpoints exist but none is intact.
        TrainingAborted: too many consecutive non-finite steps.
    """
    from minivlm.train.distributed import DistributedContext
    from minivlm.train.run_dir import claim

    dist = dist or DistributedContext.from_env()
    handle = claim(run_dir, dist, resume=resume, overwrite=overwrite)
    try:
        return _train_and_evaluate(cfg, handle, resume, overrides, max_minutes, eval_limit, progress, dist, base)
    finally:
        handle.release()


def _train_and_evaluate(cfg: VLMConfig, handle, resume: bool, overrides, max_minutes, eval_limit, progress,
                        dist, base: str | Path | None = None) -> RunOutputs:
    from minivlm.train.checkpoint import load_intact_checkpoint
    from minivlm.train.trainer import Trainer

    run_dir = handle.path
    previous = load_intact_checkpoint(run_dir, handle.run_id or None) if resume else None
    if previous is not None:
        cfg = resume_config(previous.config, overrides)  # the data, model and schedule of the run
    torch.manual_seed(cfg.train.seed)
    data_options = dict(seed=cfg.train.seed, image_size=cfg.encoder.image_size, strict=cfg.data.strict)
    train_data = build_dataset(cfg.data.mixture, "train", **data_options)
    curriculum = [build_dataset(spec, "train", **data_options) for spec, _ in cfg.data.curriculum_phases]
    if previous is not None:
        processor = previous.processor
    elif base is not None:
        processor = Processor.from_pretrained(base)
    else:
        from torch.utils.data import ConcatDataset

        corpus = ConcatDataset([*curriculum, train_data])
        tokenizer = build_tokenizer(corpus, cfg.decoder.vocab_size)
        processor = build_processor(attach_tokenizer(cfg, tokenizer), tokenizer)
    validate_config(cfg)
    model = VisionLanguageModel(cfg)
    if previous is None:
        if base is not None:
            from minivlm.safetensors_io import load_safetensors
            from minivlm.model import WEIGHTS_NAME

            model.load_checkpoint_state(load_safetensors(Path(base) / WEIGHTS_NAME))
            log.info("fine-tuning %s", base)
        init_parts_from(model)
    if dist.is_main:
        log.info("model %s: %s parameters; data %s", cfg.name, f"{model.num_parameters():,}", cfg.data.mixture)
    eval_fn = None
    if cfg.train.eval_every:
        eval_fn = periodic_eval(cfg)
    trainer = Trainer(model, processor, train_data, handle, eval_fn=eval_fn, dist=dist, progress=progress,
                      curriculum=curriculum)
    result = trainer.fit(resume=previous if previous is not None else resume, max_minutes=max_minutes)
    outputs = RunOutputs(run_dir, run_dir / "model", result.seconds, result.status, result.steps,
                         not_evaluated=unevaluated_sources(cfg.data.mixture), stop_signal=result.stop_signal,
                         skipped_steps=result.skipped_steps + result.overflow_steps)
    outputs.report = save_and_evaluate(trainer, model, cfg, result, handle.run_id, eval_limit, progress, dist)
    dist.barrier()
    return outputs


def save_and_evaluate(trainer, model: VisionLanguageModel, cfg: VLMConfig, result, run_id: str,
                      eval_limit: int | None, progress: bool, dist):
    """Write ``model/`` (replaced atomically), ``train_result.json``, ``loss.png``, and, for a run
    that trained to its end, the evaluation (``eval.json``); returns the EvalReport or None.

    A run whose steps were mostly non-finite keeps the previous ``model/`` (its checkpoint stays
    for inspection) and is not evaluated; an interrupted one is saved but not evaluated.
    """
    from minivlm.io_atomic import atomic_write_json
    from minivlm.train.lora import has_lora, merge_lora, save_lora
    from minivlm.train.plot import plot_run

    run_dir, model_dir = trainer.run_dir, trainer.run_dir / "model"
    full_state = trainer.dist.full_model_state(trainer.wrapped)  # collective under FSDP
    if not dist.is_main:
        return None
    if result.status != "nonfinite":
        if has_lora(model):
            save_lora(model, run_dir / "adapters.safetensors")  # adapters + trained projector
            merge_lora(model)  # model/ stays a plain VisionLanguageModel for chat / from_pretrained
            full_state = None
        model.save_pretrained(model_dir, state_dict=full_state)
        if trainer.dist.strategy == "fsdp":
            # Evaluate an unsharded copy: the sharded module would wait for the other ranks.
            model = VisionLanguageModel.from_pretrained(model_dir, map_location=str(dist.device))
    atomic_write_json(run_dir / "train_result.json",
                      {"run_id": run_id, **{k: v for k, v in result.__dict__.items() if k != "history"}})
    if (run_dir / "metrics.jsonl").is_file():
        plot_run(run_dir)
    else:  # stopped before its first log record (train.log_every): no curve to draw yet
        log.info("%s: no step logged yet, so no loss.png", run_dir)
    if result.status not in ("finished", "time_budget"):
        return None
    tuner = trainer.thread_tuner  # evaluate under the thread count training found fastest
    with cpu_threads(tuner.choice if tuner is not None else torch.get_num_threads()):
        report = evaluate_run(model, cfg, eval_limit=eval_limit, progress=progress)
    not_evaluated = unevaluated_sources(cfg.data.mixture)
    if not_evaluated:
        log.warning("not evaluated: %s (file data has no test split; score it with `minivlm eval --model %s "
                    "--data jsonl:TEST.jsonl`)", ", ".join(not_evaluated), model_dir)
    atomic_write_json(run_dir / "eval.json", {
        "run_id": run_id, "metrics": report.metrics, "counts": report.counts, "seconds": report.seconds,
        "train_seconds": result.seconds, "steps": result.steps, "not_evaluated": not_evaluated,
        "notes": report.notes,
        "samples": [p.__dict__ for p in report.predictions[:: max(1, len(report.predictions) // 40)]]})
    return report


@contextlib.contextmanager
def cpu_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block, restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


#: Test samples per task scored by the periodic evaluation during training.
PERIODIC_EVAL_SAMPLES = 300


def periodic_eval(cfg: VLMConfig):
    """A quick in-training evaluation: the first test samples of each task (fixed, so comparable)."""
    from minivlm.eval.runner import evaluate

    names = eval_sources(cfg.data.mixture)
    data = {n: build_dataset(n, "test", seed=cfg.train.seed, image_size=cfg.encoder.image_size) for n in names}

    def run_eval(model: VisionLanguageModel) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name, dataset in data.items():
            metrics.update(evaluate(model, dataset, limit=PERIODIC_EVAL_SAMPLES).metrics)
        return metrics

    return run_eval


def evaluate_run(model: VisionLanguageModel, cfg: VLMConfig, eval_limit: int | None = None, progress: bool = False):
    """easy-VQA on its full test split (unless limited) plus each synthetic task's test samples."""
    from minivlm.eval.runner import EvalReport, evaluate, retrieval_scores, score

    preds, seconds = [], 0.0
    retrieval_metrics, retrieval_counts, notes = {}, {}, []
    for name in eval_sources(cfg.data.mixture):
        data = build_dataset(name, "test", seed=cfg.train.seed, image_size=cfg.encoder.image_size)
        limit = eval_limit if name == "easy_vqa" else min(eval_limit or SYNTHETIC_EVAL_SAMPLES, SYNTHETIC_EVAL_SAMPLES)
        t0 = time.perf_counter()
        report = evaluate(model, data, limit=limit, progress=progress)
        found, counts, note = retrieval_scores(model, name, data, limit)
        seconds += time.perf_counter() - t0
        preds.extend(report.predictions)
        retrieval_metrics |= found
        retrieval_counts |= counts
        notes += [note] if note else []
    metrics, counts = score(preds)
    return EvalReport(metrics | retrieval_metrics, counts | retrieval_counts, seconds, preds, notes)
