"""The main job: build tokenizer, processor and model from a config, train, evaluate, report.

``minivlm train`` calls :func:`run`. Everything a later ``minivlm chat`` or ``from_pretrained``
needs ends up in ``runs/<name>/model/``; ``metrics.jsonl``, ``loss.png`` and ``eval.json`` sit
beside it.
"""

from __future__ import annotations

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


def sample_texts(sample: dict[str, Any]) -> list[str]:
    texts = []
    for message in sample["messages"]:
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
        else:
            texts.extend(item["text"] for item in content if item.get("type") == "text")
    return texts


def build_tokenizer(dataset, vocab_size: int, n_samples: int = 3000, max_tiles: int = 0) -> Tokenizer:
    """Train a BPE tokenizer on the text of the first ``n_samples`` samples of ``dataset``."""
    n = min(n_samples, len(dataset))
    corpus = [t for i in range(n) for t in sample_texts(dataset[i])]
    return Tokenizer.train(corpus, vocab_size=vocab_size, max_tiles=max_tiles)


def build_processor(cfg: VLMConfig, tokenizer: Tokenizer) -> Processor:
    image_cfg = ImageProcessorConfig(image_size=cfg.encoder.image_size, resize=cfg.data.resize,
                                     normalization=cfg.encoder.normalization, split_image=cfg.data.split_image)
    return Processor(tokenizer, ImageProcessor(image_cfg), cfg.image_seq_len, max_length=cfg.data.max_length,
                     video_max_frames=cfg.data.video_frames)


def attach_tokenizer(cfg: VLMConfig, tokenizer: Tokenizer) -> VLMConfig:
    """The decoder's vocabulary and image placeholder id follow the tokenizer."""
    cfg.decoder.vocab_size = tokenizer.vocab_size
    cfg.image_token_id = tokenizer.image_token_id
    return cfg


@dataclass
class RunOutputs:
    run_dir: Path
    model_dir: Path
    train_seconds: float
    eval_seconds: float
    metrics: dict[str, float]
    status: str
    steps: int


def eval_sources(spec: str) -> list[str]:
    """Named (non-file) datasets of a training spec: those have a test split to score."""
    return [s.name for s in parse_spec(spec) if s.path is None]


def run(cfg: VLMConfig, run_dir: str | Path, *, resume: bool = False, max_minutes: float | None = None,
        eval_limit: int | None = None, progress: bool = True, dist=None) -> RunOutputs:
    """Train ``cfg`` into ``run_dir`` and evaluate the result on every named source's test split."""
    from minivlm.train.checkpoint import latest_checkpoint
    from minivlm.train.distributed import DistributedContext
    from minivlm.train.plot import plot_run
    from minivlm.train.trainer import Trainer

    dist = dist or DistributedContext.from_env()
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.train.seed)
    train_data = build_dataset(cfg.data.mixture, "train", seed=cfg.train.seed, image_size=cfg.encoder.image_size)
    previous = latest_checkpoint(run_dir) if resume else None
    if previous is not None:
        processor = Processor.from_pretrained(previous)
        cfg = VLMConfig.from_json(previous / "config.json")
    else:
        tokenizer = build_tokenizer(train_data, cfg.decoder.vocab_size)
        processor = build_processor(attach_tokenizer(cfg, tokenizer), tokenizer)
    cfg.validate()
    model = VisionLanguageModel(cfg)
    if dist.is_main:
        log.info("model %s: %s parameters; data %s", cfg.name, f"{model.num_parameters():,}", cfg.data.mixture)
    trainer = Trainer(model, processor, train_data, run_dir, dist=dist, progress=progress)
    result = trainer.fit(resume=resume, max_minutes=max_minutes)
    model_dir = run_dir / "model"
    metrics: dict[str, float] = {}
    eval_seconds = 0.0
    if dist.is_main:
        model.save_pretrained(model_dir)
        (run_dir / "train_result.json").write_text(json.dumps(
            {k: v for k, v in result.__dict__.items() if k != "history"}, indent=2) + "\n")
        plot_run(run_dir)
        if result.status != "interrupted":
            report = evaluate_run(model, cfg, eval_limit=eval_limit, progress=progress)
            metrics, eval_seconds = report.metrics, report.seconds
            (run_dir / "eval.json").write_text(json.dumps(
                {"metrics": report.metrics, "counts": report.counts, "seconds": report.seconds,
                 "train_seconds": result.seconds, "steps": result.steps,
                 "samples": [p.__dict__ for p in report.predictions[:: max(1, len(report.predictions) // 40)]]},
                indent=2) + "\n")
    dist.barrier()
    return RunOutputs(run_dir, model_dir, result.seconds, eval_seconds, metrics, result.status, result.steps)


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
