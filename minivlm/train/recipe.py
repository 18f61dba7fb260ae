"""The main job: build tokenizer, processor and model from a config, train, evaluate, report.

``minivlm train`` calls :func:`run`. Everything a later ``minivlm chat`` or ``from_pretrained``
needs ends up in ``runs/<name>/model/``; ``metrics.jsonl``, ``loss.png`` and ``eval.json`` sit
beside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minivlm.config import VLMConfig
from minivlm.data import build_dataset
from minivlm.data.registry import parse_spec
from minivlm.model import VisionLanguageModel
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
    return Processor(tokenizer, ImageProcessor(image_cfg), cfg.image_seq_len, max_length=cfg.data.max_length,
                     video_max_frames=cfg.data.video_frames, temporal_patch_size=cfg.encoder.temporal_patch_size)


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
    run_dir: Path
    model_dir: Path
    train_seconds: float
    status: str
    steps: int
    report: Any = None  # the EvalReport (None when interrupted, and on ranks other than 0)

    @property
    def metrics(self) -> dict[str, float]:
        return self.report.metrics if self.report is not None else {}

    @property
    def eval_seconds(self) -> float:
        return self.report.seconds if self.report is not None else 0.0


#: Training-only views of a dataset are scored on the dataset's standard test form.
EVAL_FORM = {"easy_vqa_dialogues": "easy_vqa", "easy_vqa_grouped": "easy_vqa", "easy_vqa_open": "easy_vqa",
             "easy_vqa_shape": "easy_vqa", "easy_vqa_color": "easy_vqa", "shapes_grouped": "shapes",
             "charts_grouped": "charts", "multi_image_grouped": "multi_image"}


def eval_sources(spec: str) -> list[str]:
    """Named (non-file) datasets of a training spec, in their test form: those have a test split."""
    names = [EVAL_FORM.get(s.name, s.name) for s in parse_spec(spec) if s.path is None]
    return list(dict.fromkeys(names))


def run(cfg: VLMConfig, run_dir: str | Path, *, resume: bool = False, max_minutes: float | None = None,
        eval_limit: int | None = None, progress: bool = True, dist=None, base: str | Path | None = None) -> RunOutputs:
    """Train ``cfg`` into ``run_dir`` and evaluate the result on every named source's test split.

    ``base``: a checkpoint directory (e.g. written by ``minivlm import``) to fine-tune: its weights
    and processor (tokenizer, image processing, chat template) are used instead of a new tokenizer
    and random weights; ``cfg`` must be its config (with any overrides).
    """
    from minivlm.train.checkpoint import latest_checkpoint
    from minivlm.train.distributed import DistributedContext
    from minivlm.train.plot import plot_run
    from minivlm.train.trainer import Trainer

    dist = dist or DistributedContext.from_env()
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.train.seed)
    train_data = build_dataset(cfg.data.mixture, "train", seed=cfg.train.seed, image_size=cfg.encoder.image_size)
    curriculum = [build_dataset(spec, "train", seed=cfg.train.seed, image_size=cfg.encoder.image_size)
                  for spec, _ in cfg.data.curriculum_phases]
    previous = latest_checkpoint(run_dir) if resume else None
    if previous is not None:
        processor = Processor.from_pretrained(previous)
        cfg = VLMConfig.from_json(previous / "config.json")
    elif base is not None:
        processor = Processor.from_pretrained(base)
    else:
        from torch.utils.data import ConcatDataset

        corpus = ConcatDataset([*curriculum, train_data])
        tokenizer = build_tokenizer(corpus, cfg.decoder.vocab_size)
        processor = build_processor(attach_tokenizer(cfg, tokenizer), tokenizer)
    cfg.validate()
    model = VisionLanguageModel(cfg)
    if previous is None:
        if base is not None:
            from minivlm.interop.safetensors_io import load_safetensors
            from minivlm.model import WEIGHTS_NAME

            model.load_checkpoint_state(load_safetensors(Path(base) / WEIGHTS_NAME))
            log.info("fine-tuning %s", base)
        init_parts_from(model)
    if dist.is_main:
        log.info("model %s: %s parameters; data %s", cfg.name, f"{model.num_parameters():,}", cfg.data.mixture)
    eval_fn = None
    if cfg.train.eval_every:
        eval_fn = periodic_eval(cfg)
    trainer = Trainer(model, processor, train_data, run_dir, eval_fn=eval_fn, dist=dist, progress=progress,
                      curriculum=curriculum)
    result = trainer.fit(resume=resume, max_minutes=max_minutes)
    model_dir = run_dir / "model"
    report = None
    from minivlm.train.lora import has_lora, merge_lora, save_lora

    full_state = trainer.dist.full_model_state(trainer.wrapped)  # collective under FSDP
    if dist.is_main:
        if has_lora(model):
            save_lora(model, run_dir / "adapters.safetensors")  # adapters + trained projector
            merge_lora(model)  # model/ stays a plain VisionLanguageModel for chat / from_pretrained
            full_state = None
        model.save_pretrained(model_dir, state_dict=full_state)
        if trainer.dist.strategy == "fsdp":
            # Evaluate an unsharded copy: the sharded module would wait for the other ranks.
            model = VisionLanguageModel.from_pretrained(model_dir, map_location=str(dist.device))
        (run_dir / "train_result.json").write_text(json.dumps(
            {k: v for k, v in result.__dict__.items() if k != "history"}, indent=2) + "\n")
        plot_run(run_dir)
        if result.status != "interrupted":
            tuner = trainer.thread_tuner  # evaluate under the thread count training found fastest
            with cpu_threads(tuner.choice if tuner is not None else torch.get_num_threads()):
                report = evaluate_run(model, cfg, eval_limit=eval_limit, progress=progress)
            (run_dir / "eval.json").write_text(json.dumps(
                {"metrics": report.metrics, "counts": report.counts, "seconds": report.seconds,
                 "train_seconds": result.seconds, "steps": result.steps,
                 "samples": [p.__dict__ for p in report.predictions[:: max(1, len(report.predictions) // 40)]]},
                indent=2) + "\n")
    dist.barrier()
    return RunOutputs(run_dir, model_dir, result.seconds, result.status, result.steps, report)


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
    from minivlm.eval.runner import EvalReport, evaluate, score

    preds, seconds = [], 0.0
    for name in eval_sources(cfg.data.mixture):
        data = build_dataset(name, "test", seed=cfg.train.seed, image_size=cfg.encoder.image_size)
        limit = eval_limit if name == "easy_vqa" else min(eval_limit or SYNTHETIC_EVAL_SAMPLES, SYNTHETIC_EVAL_SAMPLES)
        t0 = time.perf_counter()
        report = evaluate(model, data, limit=limit, progress=progress)
        seconds += time.perf_counter() - t0
        preds.extend(report.predictions)
    metrics, counts = score(preds)
    return EvalReport(metrics, counts, seconds, preds)
