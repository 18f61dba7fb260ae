"""Checkpoints of a :class:`~minivlm.train.trainer.Trainer` and exact resume.

A checkpoint holds the weights (and the retrieval head's, in its own files), the optimizer and
gradient-scaler states, the schedule position, every global RNG and the data position (the
step: see :mod:`minivlm.train.data`). A run stopped at step ``k`` and resumed computes, on the
CPU in fp32, bit for bit the losses and weights of the run that never stopped, at a fixed
``train.cpu_threads``.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from minivlm.config import ConfigError
from minivlm.data.shards import ShardedSource
from minivlm.retrieval_head import load_head_files
from minivlm.train import checkpoint as ckpt
from minivlm.train.run_dir import trim_metrics

log = logging.getLogger("minivlm.train.trainer")  # the trainer's records, wherever its code lives


class CheckpointedRun:
    """The checkpoint half of the trainer (a mixin: the state lives on the :class:`Trainer`)."""

    @property
    def global_batch(self) -> int:
        return self.tcfg.batch_size * self.tcfg.grad_accum * self.dist.world_size

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights that a resumed run needs (a collective under FSDP)."""
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "optimizer": self.dist.optimizer_state(self.model, self.optimizer),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(),
            "nonfinite_total": self.nonfinite_total,
            "overflow_total": self.overflow_total,
            "skipped_samples": dict(self.skipped_samples),
            "data_position": {"next_step": self.step, "global_batch": self.global_batch, "seed": self.data_seed},
            "run_id": self.run.run_id,
        }

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0; every rank must call it)."""
        model_state = self.dist.full_model_state(self.model)  # collective under FSDP
        trainer_state = self.state_dict()
        self._saved_step = self.step
        if not self.dist.is_main:
            return None

        def write_model(directory: Path) -> None:
            self.model.save_pretrained(directory, state_dict=model_state)

        return ckpt.save_checkpoint(self.run_dir, self.step, write_model, trainer_state, self.tcfg.keep_checkpoints,
                                    run_id=self.run.run_id)

    def resume(self, checkpoint: str | Path | ckpt.IntactCheckpoint | None = None) -> bool:
        """Restore model, optimizer, schedule position, scaler, RNG and data position.

        Reads ``checkpoint`` (a directory, or one already read by
        :func:`~minivlm.train.checkpoint.load_intact_checkpoint`), or else the newest intact
        checkpoint of this run (newer damaged ones are skipped with a warning); returns False
        (and changes nothing but the metrics log, cut back to step 0) when there is none.

        Raises:
            ValueError: the checkpoint was trained with another global batch size (its data
                positions would not line up).
            FileNotFoundError: ``checkpoint`` is not a training checkpoint.
            CheckpointError: ``checkpoint`` cannot be read, or no checkpoint of the run is intact.
        """
        if isinstance(checkpoint, ckpt.IntactCheckpoint):
            found = checkpoint
        elif checkpoint:
            found = ckpt.read_checkpoint(checkpoint)
        else:
            found = ckpt.load_intact_checkpoint(self.run_dir, self.run.run_id or None)
        if found is None:
            log.info("no checkpoint in %s: starting from step 0", self.run_dir)
            if self.dist.is_main:
                trim_metrics(self.metrics_path, 0)  # records of an attempt that died before its first checkpoint
            return False
        directory, state = found.path, found.trainer_state
        position = state["data_position"]
        if position["global_batch"] != self.global_batch:
            raise ValueError(f"cannot resume {directory}: it was trained with global batch "
                             f"{position['global_batch']}, this run has {self.global_batch} "
                             f"(batch_size x grad_accum x world_size)")
        self._check_shard_readers(directory, found.config.data.num_workers)
        self.dist.load_model_state(self.model, found.model_state)
        self._load_retrieval_head(directory)
        self.dist.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        if state["total_steps"] != self.total_steps:
            log.warning("resuming the checkpoint's schedule of %d steps (train.steps=%d is ignored)",
                        state["total_steps"], self.total_steps)
        self.total_steps = state["total_steps"]
        self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]
        self.data_seed = position["seed"]
        self.nonfinite_total = state["nonfinite_total"]
        self.overflow_total = state["overflow_total"]
        self.skipped_samples = Counter(state["skipped_samples"])
        self._saved_step = self.step
        if self.dist.is_main:
            trim_metrics(self.metrics_path, self.step)  # the resumed run rewrites what came after
        log.info("resumed from %s at step %d", directory, self.step)
        return True

    def _check_shard_readers(self, directory: Path, saved_workers: int) -> None:
        """A sharded source splits its shards among (rank, DataLoader worker) readers: with another
        ``data.num_workers`` a resumed run would read other records than the run it continues."""
        workers = self.cfg.data.num_workers
        if saved_workers != workers and any(isinstance(d, ShardedSource) for d in (*self.curriculum, self.dataset)):
            raise ConfigError(f"cannot resume {directory} with data.num_workers={workers}: it read its sharded data "
                              f"with data.num_workers={saved_workers}, and each DataLoader worker reads shards of its "
                              f"own; resume with data.num_workers={saved_workers}")

    def _load_retrieval_head(self, directory: Path) -> None:
        """A checkpoint keeps the head in its own files (:meth:`VisionLanguageModel.save_pretrained`)."""
        head = getattr(self.model, "retrieval_head", None)
        if head is None:
            return
        saved = load_head_files(directory, self.model.encoder.embed_dim, self.cfg.decoder.width, self.device)
        if saved is None:
            raise ckpt.CheckpointError(f"{directory} holds no retrieval head, but this run trains one "
                                       f"(train.retrieval_weight={self.tcfg.retrieval_weight})")
        head.load_state_dict(saved.state_dict())
