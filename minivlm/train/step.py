"""One optimizer step of :class:`~minivlm.train.trainer.Trainer`: micro-batches, the global loss
normalisation, the contrastive term, clipping, and skipping non-finite or overflowing steps.

The loss of a step is normalised by the supervised tokens (or token weights) of the *whole
global batch*: each micro-batch contributes ``loss_sum / N_global``, so a sample's weight does
not depend on how many tokens its micro-batch happened to hold (per-micro-batch means
over-weight short batches), and the gradient is that of one big batch's mean loss however the
batch is split across micro-batches and ranks.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from contextlib import nullcontext
from typing import Any, Iterator

import torch

from minivlm.train.data import (
    RenderedDataset,
    RenderedGroup,
    Skipped,
    TrainCollator,
    supervised_tokens,
    supervised_weight,
    to_device,
)
from minivlm.train.optim import lr_multiplier
from minivlm.train.precision import autocast

log = logging.getLogger("minivlm.train.trainer")  # the trainer's records, wherever its code lives

MODEL_INPUTS = ("input_ids", "pixel_values", "labels", "attention_mask", "position_ids", "document_ids",
                "branch_ids", "loss_weights")
#: Samples tried in order to find one usable micro-batch when a rank's first step has none.
_FILLER_SEARCH = 1000


class TrainingAborted(RuntimeError):
    """Too many consecutive non-finite losses, or another unrecoverable training state."""


class OptimizerStep:
    """The step half of the trainer (a mixin: the state lives on the :class:`Trainer`)."""

    def _train_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics record."""
        t0 = time.perf_counter()
        micro = [to_device(next(batches), self.device) for _ in range(self.tcfg.grad_accum)]
        usable = [b for b in micro if b["n_samples"]]
        skipped = sum((b["skipped"] for b in micro), Counter())
        # n_global normalises the loss: the supervised tokens' count, or their total loss weight.
        counts = [supervised_tokens(b) for b in usable]
        n_global, n_tokens, n_skipped = self.dist.all_reduce_sums(
            sum(supervised_weight(b, n) for b, n in zip(usable, counts)), sum(counts), sum(skipped.values()))
        if n_skipped:
            self.skipped_samples.update(self.dist.gather_counts(skipped))
        multiplier = lr_multiplier(self.step, self.total_steps, self.tcfg)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * multiplier
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; multiplying by world_size turns that into the sum
        # the global-token normalisation needs.
        weight = self.dist.world_size / n_global if n_global else 0.0
        passes = self._micro_passes(micro, usable)
        # float64, so the sum over micro-batches rounds alike on one rank and on several.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (batch, counted) in enumerate(passes):
            loss_sum += self._micro_step(batch, weight if counted else 0.0, sync=i == len(passes) - 1)
        total_loss, step_tokens = self.dist.all_reduce_sums(float(loss_sum),
                                                            sum(int(b["attention_mask"].sum()) for b in usable))
        loss = total_loss / n_global if n_global > 0 else 0.0
        contrastive = self._contrastive_step() if self.contrastive is not None else None
        # A non-finite contrastive loss skips the step like a non-finite generation loss.
        checked = loss if contrastive is None else loss + self.tcfg.retrieval_weight * contrastive
        outcome, grad_norm = self._update(checked, n_global)
        self.step += 1
        record = {"step": self.step, "loss": loss if math.isfinite(loss) else None, "lr": self.tcfg.lr * multiplier,
                  "grad_norm": grad_norm if grad_norm is None or math.isfinite(grad_norm) else None,
                  "tokens_per_s": step_tokens / (time.perf_counter() - t0), "supervised_tokens": n_tokens,
                  "tokens": step_tokens}
        if contrastive is not None:
            record["contrastive_loss"] = contrastive if math.isfinite(contrastive) else None
        if outcome != "ok":
            record["skipped"] = outcome
        return record

    def _micro_passes(self, micro: list[dict[str, Any]], usable: list[dict[str, Any]]) -> list[tuple[dict, bool]]:
        """The forward/backward passes of a step as ``(batch, counts toward the loss)``.

        One process skips empty micro-batches (every sample refused by the processor). Ranks
        of a group cannot: FSDP gathers weights in every forward and DDP reduces gradients in
        the last backward, both collectives, so every rank runs ``grad_accum`` passes and an
        empty micro-batch is replaced by a usable one whose loss is weighted by 0.
        """
        if self.dist.world_size == 1:
            return [(b, True) for b in usable]
        if usable:
            self._filler = usable[-1]
        filler = self._filler if self._filler is not None else self._find_filler()
        return [(b, True) if b["n_samples"] else (filler, False) for b in micro]

    def _find_filler(self) -> dict[str, Any]:
        rendered = RenderedDataset(self.dataset, self.processor)
        collate = TrainCollator(self.processor.tokenizer.pad_id,
                                self.cfg.data.max_length if self.cfg.data.packing else None,
                                self.processor.tokenizer.image_token_id, self.tcfg.loss_weighting)
        for index in range(min(len(rendered), _FILLER_SEARCH)):
            item = rendered[index]
            if not isinstance(item, Skipped) and not (isinstance(item, RenderedGroup) and not item.samples):
                self._filler = to_device(collate([item]), self.device)
                return self._filler
        raise TrainingAborted(f"none of the first {_FILLER_SEARCH} samples renders (all skipped by the processor); "
                              f"check data.max_length against the samples' lengths")

    def _micro_step(self, batch: dict[str, Any], weight: float, sync: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch scaled by ``weight``; returns its summed loss
        (zero for a filler pass, ``weight == 0``)."""
        inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
        sync_ctx = nullcontext() if sync else self.dist.no_sync(self.wrapped)
        with sync_ctx:
            with autocast(self.precision, self.device):
                # validate=False: the processor and collator built this batch (placeholders match
                # the images, ids come from the tokenizer), so no value check reads the device.
                out = self.forward_module(**inputs, return_logits=False, validate=False)
            self.scaler.scale(out.loss_sum * weight).backward()
        return out.loss_sum.detach() if weight else torch.zeros((), device=self.device)

    def _contrastive_step(self) -> float:
        """Forward + backward of the contrastive objective on this step's pairs (scaled by
        ``train.retrieval_weight``; its gradient adds to the generation batch's); returns its loss."""
        with autocast(self.precision, self.device):
            loss = self.contrastive.loss(self.model, self.step)
        self.scaler.scale(loss * self.tcfg.retrieval_weight).backward()
        return float(loss.detach())

    def _update(self, loss: float, n_global: float) -> tuple[str, float | None]:
        """Clip and apply the accumulated gradient, or skip the step.

        Returns ``(outcome, grad norm before clipping)`` with outcome ``ok``, ``nonfinite``
        (loss or gradient not finite), ``overflow`` (fp16: the scaler backs off) or ``empty``
        (no supervised token in the global batch). Every rank reaches the same outcome: the
        loss and the gradient norm are global.
        """
        if n_global == 0:
            log.warning("step %d has no supervised token in its global batch; skipped", self.step)
            return "empty", None
        if not math.isfinite(loss):
            self._count_nonfinite(f"loss {loss}")
            return "nonfinite", None
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_gradients()
        if not math.isfinite(grad_norm):
            if self.scaler.is_enabled():
                # Dynamic loss scaling (Micikevicius et al. 2018): an inf gradient means the
                # scale is too high; skip and halve it. Decided here from the global norm, not
                # by scaler.step's per-rank inf check, so sharded (FSDP) ranks cannot disagree.
                self.overflow_total += 1
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
                log.info("fp16 gradient overflow at step %d; loss scale -> %g", self.step, self.scaler.get_scale())
                return "overflow", grad_norm
            self._count_nonfinite(f"gradient norm {grad_norm}")
            return "nonfinite", grad_norm
        self._consecutive_bad = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return "ok", grad_norm

    def _count_nonfinite(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._consecutive_bad += 1
        self.nonfinite_total += 1
        log.warning("non-finite %s at step %d (%d in a row); step skipped", what, self.step, self._consecutive_bad)
        if self._consecutive_bad >= self.tcfg.max_nonfinite:
            raise TrainingAborted(
                f"{self._consecutive_bad} consecutive steps with a non-finite loss or gradient (last at step "
                f"{self.step}, train.max_nonfinite={self.tcfg.max_nonfinite}); lower train.lr, use "
                f"train.precision=bf16 or fp32, or check the data")

    def _clip_gradients(self) -> float:
        """Global L2 norm of the (unscaled) gradients, clipped to ``train.grad_clip`` when set."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
        value = float(full)
        if self.tcfg.grad_clip > 0 and math.isfinite(value):
            torch.nn.utils.clip_grads_with_norm_(params, self.tcfg.grad_clip, norm)
        return value
