"""What the trainer does when things go wrong: non-finite losses, signals, bad settings."""

from __future__ import annotations

import math
import os
import signal

import pytest
import trainkit as tk

from minivlm.config import ConfigError
from minivlm.train import checkpoint as ckpt
from minivlm.train.data import StepBatchSampler
from minivlm.train.trainer import RunDirectoryError, Trainer, TrainingAborted


def _trainer(run_dir, *overrides, data=None, eval_fn=None) -> Trainer:
    cfg = tk.config("train.steps=5", "train.max_nonfinite=3", *overrides)
    return Trainer(tk.model(cfg), tk.processor(), data or tk.dataset(), run_dir, eval_fn=eval_fn, dist=tk.cpu(),
                   progress=False)


def _poison_loss(monkeypatch, trainer: Trainer, bad_calls: set[int]) -> None:
    """Make the model's summed loss NaN on the given (0-based) forward calls."""
    loss_sum = trainer.model.loss_sum
    calls = iter(range(10**6))

    def poisoned(*args, **kwargs):
        total, count = loss_sum(*args, **kwargs)
        return (total * math.nan if next(calls) in bad_calls else total), count

    monkeypatch.setattr(trainer.model, "loss_sum", poisoned)


def test_a_non_finite_loss_skips_the_step_and_is_counted(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    _poison_loss(monkeypatch, trainer, bad_calls={1})  # step 2
    result = trainer.fit()
    assert result.status == "finished" and result.steps == 5
    assert result.skipped_steps == 1
    assert [h.get("skipped") for h in result.history] == [None, "nonfinite", None, None, None]
    assert result.history[1]["loss"] is None and math.isfinite(result.final_loss)
    assert trainer.optimizer.state[next(trainer.model.parameters())]["step"] == 4  # one update skipped


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped_too(tmp_path):
    trainer = _trainer(tmp_path)
    param = next(trainer.model.projector.parameters())
    calls = iter(range(10**6))
    param.register_hook(lambda grad: grad * math.inf if next(calls) == 0 else grad)
    result = trainer.fit()
    assert result.history[0]["skipped"] == "nonfinite" and result.history[0]["loss"] is not None
    assert result.skipped_steps == 1 and result.steps == 5


def test_consecutive_non_finite_losses_abort_with_a_clear_message(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    _poison_loss(monkeypatch, trainer, bad_calls=set(range(10**6)))
    with pytest.raises(TrainingAborted, match=r"3 consecutive steps with a non-finite loss.*lower train.lr"):
        trainer.fit()
    assert trainer.nonfinite_total == 3


def test_sigterm_saves_a_checkpoint_and_returns_interrupted(tmp_path):
    def send_sigterm(model):
        os.kill(os.getpid(), signal.SIGTERM)
        return {"accuracy": 0.5}

    trainer = _trainer(tmp_path, "train.eval_every=3", "train.save_every=0", eval_fn=send_sigterm)
    result = trainer.fit()
    assert result.status == "interrupted" and result.steps == 3
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_000003"
    assert ckpt.load_trainer_state(latest)["step"] == 3


def test_an_unwritable_run_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    model = tk.model(tk.config())
    with pytest.raises(RunDirectoryError, match="a_file/run is not writable"):
        Trainer(model, tk.processor(), tk.dataset(), blocker / "run", dist=tk.cpu(), progress=False)
    assert model.processor is None  # nothing was set up


@pytest.mark.parametrize(("override", "field"), [
    ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.steps=0", "train.steps"),
    ("train.lr=0", "train.lr"),
    ("train.max_nonfinite=0", "train.max_nonfinite"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
    ("train.grad_clip=-1", "train.grad_clip"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints"),
    ("train.stage=pretrain", "train.stage"),
    ("train.precision=half", "train.precision"),
])
def test_invalid_training_settings_name_the_field(tmp_path, override, field):
    with pytest.raises(ValueError, match=field):
        _trainer(tmp_path, override)


def test_invalid_settings_raise_config_error(tmp_path):
    with pytest.raises(ConfigError):
        _trainer(tmp_path, "train.batch_size=0")


def test_unrenderable_samples_are_counted_and_an_empty_micro_batch_is_skipped(tmp_path):
    samples = list(tk.shapes_samples(16))
    empty = StepBatchSampler(16, 4, 2, seed=0).indices(0, 1)  # the whole second micro-batch of step 1
    data = tk.with_skipped_micro_batch(samples, empty)
    trainer = _trainer(tmp_path, "train.grad_accum=2", "train.steps=2", data=data)
    result = trainer.fit()
    assert result.status == "finished" and result.skipped_steps == 0
    assert sum(result.skipped_samples.values()) == 4
    assert all("no supervised token left" in reason for reason in result.skipped_samples)
    assert all(h["loss"] is not None for h in result.history)


def test_a_time_budget_shortens_the_schedule_so_the_decay_finishes(tmp_path, monkeypatch):
    import minivlm.train.trainer as trainer_module

    trainer = _trainer(tmp_path, "train.steps=1000", "train.save_every=0", "train.warmup_steps=30")
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: trainer.step * 3.0)  # 3 s per step
    result = trainer.fit(max_minutes=5.0)
    # Calibrated after BUDGET_CALIBRATION_STEPS steps, the schedule ends before the clock runs out.
    assert trainer_module.BUDGET_CALIBRATION_STEPS < trainer.total_steps < 1000
    assert result.status == "finished" and result.steps == trainer.total_steps
    assert trainer.optimizer.param_groups[0]["lr"] < trainer.tcfg.lr * 0.2  # decayed to near min_lr
