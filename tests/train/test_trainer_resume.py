"""Exact resume: a run stopped at step k and resumed equals, bit for bit, the run that never stopped.

On the CPU in fp32 the optimizer, scheduler, RNG and data position are restored exactly, so
losses and weights are compared with ``==`` / ``torch.equal``, not a tolerance.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import trainkit as tk

from minivlm.train import checkpoint as ckpt
from minivlm.train.trainer import Trainer

OVERRIDES = ("train.steps=6", "train.save_every=3", "train.keep_checkpoints=4", "train.warmup_steps=2")


def _trainer(run_dir, *overrides, seed=0, eval_fn=None) -> Trainer:
    cfg = tk.config(*OVERRIDES, *overrides)
    return Trainer(tk.model(cfg, seed=seed), tk.processor(), tk.dataset(), run_dir, eval_fn=eval_fn, dist=tk.cpu(),
                   progress=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Six steps straight; returns (losses, final weights, global torch RNG state after)."""
    trainer = _trainer(tmp_path_factory.mktemp("uninterrupted"))
    result = trainer.fit()
    return [h["loss"] for h in result.history], tk.weights(trainer.model), torch.get_rng_state()


def _assert_same_as_uninterrupted(trainer: Trainer, history: list[dict], uninterrupted, from_step: int) -> None:
    losses, weights, rng = uninterrupted
    assert [h["step"] for h in history] == list(range(from_step + 1, 7))
    assert [h["loss"] for h in history] == losses[from_step:]
    resumed = trainer.model.state_dict()
    assert resumed.keys() == weights.keys()
    unequal = [k for k in weights if not torch.equal(resumed[k], weights[k])]
    assert not unequal, f"weights differ after resume: {unequal}"
    # The global RNG stream (dropout, augmentation) continues exactly where it would have.
    assert torch.equal(torch.get_rng_state(), rng)


def test_resume_after_a_crash_is_bitwise_identical(tmp_path, uninterrupted):
    crashing = _trainer(tmp_path)
    tk.crash_after_checkpoint(crashing, step=3)
    with pytest.raises(tk.SimulatedCrash):
        crashing.fit()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000003"

    torch.manual_seed(1234)  # the new process starts from other weights and another RNG state
    resumed = _trainer(tmp_path, seed=99)
    result = resumed.fit(resume=True)
    assert result.status == "finished"
    _assert_same_as_uninterrupted(resumed, result.history, uninterrupted, from_step=3)
    # metrics.jsonl holds each step once: what the crashed run logged after step 3 was dropped.
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_bitwise_identical(tmp_path, uninterrupted):
    def send_sigterm(model):
        os.kill(os.getpid(), signal.SIGTERM)
        return {}

    # eval_every=2: the signal arrives during step 2, which is not a save_every step.
    interrupted = _trainer(tmp_path, "train.eval_every=2", eval_fn=send_sigterm)
    handler_before = signal.getsignal(signal.SIGTERM)
    result = interrupted.fit()
    assert result.status == "interrupted" and result.steps == 2
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000002"
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the trainer's handler is removed

    resumed = _trainer(tmp_path, seed=5)
    result = resumed.fit(resume=True)
    _assert_same_as_uninterrupted(resumed, result.history, uninterrupted, from_step=2)


def test_resume_refuses_a_different_global_batch(tmp_path):
    _trainer(tmp_path, "train.steps=3").fit()
    other = _trainer(tmp_path, "train.steps=3", "train.batch_size=2")
    with pytest.raises(ValueError, match="global batch 4, this run has 2"):
        other.resume()


def test_resume_without_a_checkpoint_starts_from_step_zero(tmp_path):
    trainer = _trainer(tmp_path, "train.steps=2", "train.save_every=0")
    assert trainer.resume() is False
    result = trainer.fit(resume=True)
    assert result.steps == 2 and [h["step"] for h in result.history] == [1, 2]
    assert ckpt.latest_checkpoint(tmp_path) is None  # save_every=0 writes no checkpoint


def test_resume_from_a_directory_that_is_not_a_checkpoint_fails(tmp_path):
    (tmp_path / "not_a_checkpoint").mkdir()
    with pytest.raises(FileNotFoundError, match="trainer_state.pt is missing"):
        _trainer(tmp_path).resume(tmp_path / "not_a_checkpoint")
