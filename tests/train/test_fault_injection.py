"""Faults a training run meets, injected for real: nothing written is lost, and each is reported.

Reused run directories, two writers at once (forked processes), ``kill -9`` at random moments
(a fixed seed), a disk that fills up (a tiny tmpfs) or is read-only, damaged checkpoints, a
torn metrics line, non-finite training and signals. Tests that mount a tmpfs skip where the
machine does not allow user + mount namespaces.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import random
import signal
import time
from pathlib import Path

import faultkit
import pytest
import torch
import trainkit as tk

from minivlm.config import ConfigError
from minivlm.io_atomic import WriteError
from minivlm.model import VisionLanguageModel
from minivlm.train import checkpoint as ckpt
from minivlm.train.recipe import resume_config
from minivlm.train.run_dir import LOCK_NAME, RUN_FILE, RunDirectory, RunDirectoryError, read_run_id
from minivlm.train.trainer import Trainer

STEPS = 6


def _trainer(run_dir, *overrides, seed=0) -> Trainer:
    # One fixed thread: the resumed runs below are compared bit for bit with uninterrupted ones.
    cfg = tk.config(f"train.steps={STEPS}", "train.cpu_threads=1", "train.warmup_steps=2", *overrides)
    return Trainer(tk.model(cfg, seed=seed), tk.processor(), tk.dataset(), run_dir, dist=tk.cpu(), progress=False)


def _snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of a run directory (but the lock, whose holder line changes) and its hash."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def _metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """STEPS steps straight: the final weights every resumed run below must reproduce exactly."""
    trainer = _trainer(tmp_path_factory.mktemp("uninterrupted"))
    trainer.fit()
    trainer.close()
    return tk.weights(trainer.model)


# ---- one run per directory ---------------------------------------------------------------------
def test_a_new_run_into_a_directory_holding_a_run_is_refused_and_changes_nothing(tmp_path):
    first = _trainer(tmp_path, "train.save_every=2")
    first.fit()
    first.close()
    before, first_id = _snapshot(tmp_path), read_run_id(tmp_path)
    second = _trainer(tmp_path, "train.save_every=4", "train.seed=7")
    with pytest.raises(RunDirectoryError, match="already holds a run .*checkpoints up to step 6.*--resume"):
        second.fit()
    assert _snapshot(tmp_path) == before
    assert second.fit(overwrite=True).status == "finished"  # explicitly asked: the old run goes
    second_id = read_run_id(tmp_path)
    assert second_id != first_id and [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_000004", "step_000006"]
    assert {ckpt.checkpoint_run_id(p) for p in ckpt.checkpoint_dirs(tmp_path)} == {second_id}


def _train_when_told(run_dir: str, go: str) -> str:
    """Child: wait for the start signal, then train into ``run_dir``; returns its run id."""
    while not os.path.exists(go):
        time.sleep(0.002)
    trainer = _trainer(Path(run_dir), "train.save_every=1", "train.keep_checkpoints=3")
    trainer.fit()
    return trainer.run.run_id


def test_two_writers_at_once_one_is_refused_and_the_others_run_is_intact(tmp_path):
    run_dir, go = tmp_path / "run", tmp_path / "go"
    children = [faultkit.start_child(_train_when_told, str(run_dir), str(go)) for _ in range(2)]
    go.touch()
    outcomes = [faultkit.wait_child(pid, fd) for pid, fd in children]
    finished = [report["ok"] for code, report in outcomes if code == 0]
    refused = [report["error"] for code, report in outcomes if code != 0]
    assert len(finished) == 1 and len(refused) == 1, outcomes
    assert refused[0].startswith("RunDirectoryLocked") and "is being written by another process (pid" in refused[0]
    # The winner's run is whole: each step logged once, every checkpoint its own.
    assert _metric_steps(run_dir) == list(range(1, STEPS + 1))
    assert read_run_id(run_dir) == finished[0]
    assert {ckpt.checkpoint_run_id(p) for p in ckpt.checkpoint_dirs(run_dir)} == {finished[0]}


def test_pruning_and_clean_up_touch_only_the_runs_own_checkpoints(tmp_path):
    (tmp_path / RUN_FILE).write_text(json.dumps({"run_id": "mine"}))
    foreign = tmp_path / "checkpoints" / "step_000099"
    foreign.mkdir(parents=True)
    (foreign / ckpt.MARKER_NAME).write_text(json.dumps({"run_id": "other", "step": 99}))
    (foreign / ckpt.STATE_NAME).write_bytes(b"another run's state")
    foreign_tmp = tmp_path / "checkpoints" / ".tmp_step_000050.other"
    foreign_tmp.mkdir()
    own_tmp = tmp_path / "checkpoints" / ".tmp_step_000002.mine"  # this run, killed mid-write
    own_tmp.mkdir()
    trainer = _trainer(tmp_path, "train.save_every=1", "train.keep_checkpoints=1")
    trainer.fit(resume=True)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [".tmp_step_000050.other", f"step_{STEPS:06d}", "step_000099"]
    assert ckpt.checkpoint_run_id(tmp_path / "checkpoints" / f"step_{STEPS:06d}") == "mine"


# ---- the final model ---------------------------------------------------------------------------
def _saved_model(run_dir: Path, seed: int) -> dict:
    model = tk.model(tk.config(), seed=seed)
    model.processor = tk.processor()
    model.save_pretrained(run_dir / "model")
    return tk.weights(model)


def test_a_failure_while_saving_the_model_keeps_the_previous_one_loadable(tmp_path, monkeypatch):
    previous = _saved_model(tmp_path, seed=1)
    import safetensors.torch

    def disk_full(state, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(WriteError, match="could not write .*model \\(disk full.*previous version is unchanged"):
        _saved_model(tmp_path, seed=2)
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "model")
    assert _weights_equal(tk.weights(loaded), previous) and loaded.processor is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left


def test_a_full_disk_keeps_the_previous_model_and_checkpoint(tmp_path):
    """A 1.5 MiB tmpfs: the first checkpoint fits, the second does not; a 0.5 MiB one holds one model."""

    def train_until_full(mount: Path):
        trainer = _trainer(mount / "run", "train.save_every=1", "train.keep_checkpoints=1")
        try:
            trainer.fit()
        except OSError as err:
            error = (err.errno, str(err))
        else:
            error = None
        found = ckpt.load_intact_checkpoint(mount / "run")
        return {"error": error, "resumable_step": found.step, "metrics": _metric_steps(mount / "run")}

    outcome = faultkit.in_tmpfs(train_until_full, size_kib=1536)
    assert outcome["error"] is not None and outcome["error"][0] == errno.ENOSPC
    assert outcome["resumable_step"] >= 1 and outcome["metrics"][-1] >= outcome["resumable_step"]

    def save_twice(mount: Path):
        first = _saved_model(mount, seed=1)
        try:
            _saved_model(mount, seed=2)
        except WriteError as err:
            error = (err.errno, str(err))
        loaded = VisionLanguageModel.from_pretrained(mount / "model")
        return {"error": error, "previous_loads": _weights_equal(tk.weights(loaded), first),
                "entries": sorted(p.name for p in mount.iterdir())}

    outcome = faultkit.in_tmpfs(save_twice, size_kib=512)
    assert outcome["error"][0] == errno.ENOSPC and "disk full" in outcome["error"][1]
    assert outcome["previous_loads"] and outcome["entries"] == ["model"]


def test_a_read_only_run_directory_fails_before_training_and_keeps_its_model(tmp_path):
    def prepare(mount: Path):
        _saved_model(mount / "run", seed=1)

    def try_to_train(mount: Path):
        try:
            _trainer(mount / "run")
        except RunDirectoryError as err:
            message = str(err)
        VisionLanguageModel.from_pretrained(mount / "run" / "model")
        return message

    message = faultkit.in_tmpfs(try_to_train, size_kib=2048, readonly=True, prepare=prepare)
    assert "run is not writable" in message and "Read-only file system" in message


# ---- resuming ----------------------------------------------------------------------------------
def _crashed_run(run_dir: Path, at_step: int = 4) -> None:
    trainer = _trainer(run_dir, "train.save_every=1", "train.keep_checkpoints=5")
    tk.crash_after_checkpoint(trainer, step=at_step)
    with pytest.raises(tk.SimulatedCrash):
        trainer.fit()
    trainer.close()


def test_resume_skips_damaged_checkpoints_and_says_which(tmp_path, uninterrupted, caplog):
    _crashed_run(tmp_path)
    (tmp_path / "checkpoints" / "step_000004" / ckpt.STATE_NAME).write_bytes(b"garbage, not a zip file")
    weights = tmp_path / "checkpoints" / "step_000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    resumed = _trainer(tmp_path, "train.save_every=1", "train.keep_checkpoints=5", seed=9)
    with caplog.at_level(logging.WARNING, logger="minivlm.train.checkpoint"):
        result = resumed.fit(resume=True)
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping checkpoint")]
    assert len(skipped) == 2
    assert "step_000004/trainer_state.pt" in skipped[0] and "corrupt or truncated" in skipped[0]
    assert "step_000003/model.safetensors" in skipped[1] and "corrupt or truncated" in skipped[1]
    assert result.history[0]["step"] == 3  # resumed from step 2, the newest intact one
    assert _weights_equal(tk.weights(resumed.model), uninterrupted)
    assert _metric_steps(tmp_path) == list(range(1, STEPS + 1))


def test_with_no_intact_checkpoint_resume_fails_naming_every_file(tmp_path):
    _crashed_run(tmp_path, at_step=2)
    for directory in ckpt.checkpoint_dirs(tmp_path):
        (directory / ckpt.STATE_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError) as caught:
        _trainer(tmp_path).fit(resume=True)
    message = str(caught.value)
    assert message.startswith(f"no intact checkpoint in {tmp_path / 'checkpoints'}")
    assert "step_000002/trainer_state.pt (16 bytes) cannot be read" in message and "step_000001" in message


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path, uninterrupted):
    _crashed_run(tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.2')  # the process died inside this write
    resumed = _trainer(tmp_path, seed=3)
    assert resumed.fit(resume=True).status == "finished"
    assert _metric_steps(tmp_path) == list(range(1, STEPS + 1))
    assert _weights_equal(tk.weights(resumed.model), uninterrupted)


def test_resume_refuses_overrides_it_cannot_apply_and_applies_the_safe_ones():
    saved = tk.config("train.steps=20")
    with pytest.raises(ConfigError) as caught:
        resume_config(saved, ["train.steps=30", "train.lr=0.5", "train.save_every=5"])
    message = str(caught.value)
    assert "cannot change train.lr from 0.003 to 0.5, train.steps from 20 to 30" in message
    assert "--overwrite" in message and "save_every" not in message
    resumed = resume_config(saved, ["train.steps=20", "train.save_every=5", "train.log_every=3"])
    assert (resumed.train.steps, resumed.train.save_every, resumed.train.log_every) == (20, 5, 3)


# ---- runs that did not train -------------------------------------------------------------------
def test_a_run_whose_steps_were_mostly_non_finite_is_not_reported_finished(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "train.steps=8", "train.max_nonfinite=100", "train.save_every=4")
    loss_sum = trainer.model.loss_sum
    calls = iter(range(10**6))

    def seven_of_eight_nan(*args, **kwargs):
        total, count = loss_sum(*args, **kwargs)
        return (total if next(calls) == 0 else total * math.nan), count

    monkeypatch.setattr(trainer.model, "loss_sum", seven_of_eight_nan)
    result = trainer.fit()
    assert result.steps == 8 and result.skipped_steps == 7 and result.status == "nonfinite"
    trainer.close()
    # Resuming the finished run judges all of it, not only the (empty) rest.
    again = _trainer(tmp_path, "train.steps=8", "train.max_nonfinite=100", "train.save_every=4")
    assert again.fit(resume=True).status == "nonfinite"


def test_sigterm_saves_and_reports_the_signal(tmp_path):
    def send_sigterm(model):
        os.kill(os.getpid(), signal.SIGTERM)
        return {}

    cfg = tk.config("train.steps=6", "train.eval_every=2", "train.save_every=0")
    trainer = Trainer(tk.model(cfg), tk.processor(), tk.dataset(), tmp_path, eval_fn=send_sigterm, dist=tk.cpu(),
                      progress=False)
    result = trainer.fit()
    assert (result.status, result.stop_signal, result.steps) == ("interrupted", signal.SIGTERM, 2)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000002"


# ---- kill -9 at random moments -----------------------------------------------------------------
KILL_STEPS = 12


def _train_and_publish(run_dir: str) -> float:
    """Child: train (resuming whatever is there), writing a checkpoint and the final model/ after
    every step, as many write paths as possible to be killed inside. Returns seconds taken."""
    t0 = time.perf_counter()
    trainer = _trainer(Path(run_dir), f"train.steps={KILL_STEPS}", "train.save_every=1", "train.keep_checkpoints=2")
    save = trainer.save

    def save_and_publish():
        path = save()
        trainer.model.save_pretrained(trainer.run_dir / "model")
        return path

    trainer.save = save_and_publish
    trainer.fit(resume=True)
    return time.perf_counter() - t0


def _check_after_kill(run_dir: Path) -> int:
    """What a kill may never leave behind: a held lock, an unreadable checkpoint or model, a
    metrics line other than the last that does not parse. Returns the newest checkpoint's step."""
    RunDirectory.acquire(run_dir).release()
    for directory in ckpt.checkpoint_dirs(run_dir):
        ckpt.read_checkpoint(directory)
    if (run_dir / "model").exists():
        VisionLanguageModel.from_pretrained(run_dir / "model")
    if (run_dir / "metrics.jsonl").exists():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()[:-1]:
            json.loads(line)
    latest = ckpt.latest_checkpoint(run_dir)
    return int(latest.name[5:]) if latest else 0


def test_kill_9_at_random_moments_loses_nothing_and_resumes_exactly(tmp_path):
    reference = tmp_path / "reference"
    seconds = faultkit.in_child(_train_and_publish, str(reference))
    expected = tk.weights(VisionLanguageModel.from_pretrained(reference / "model"))
    run_dir = tmp_path / "killed"
    rng = random.Random(17)
    kills, done = 0, 0
    while kills < 5 and done < KILL_STEPS - 1:
        pid, result = faultkit.start_child(_train_and_publish, str(run_dir))
        # A random moment within the first half of what is left of the run (each start resumes where
        # the last stopped): the half leaves room for a shared machine's speed to change between runs.
        time.sleep(rng.uniform(0.0, 0.5 * seconds * (KILL_STEPS - done) / KILL_STEPS))
        faultkit.kill9(pid)
        code, _ = faultkit.wait_child(pid, result)
        kills += code == -signal.SIGKILL
        done = _check_after_kill(run_dir)
    assert kills >= 3
    faultkit.in_child(_train_and_publish, str(run_dir))
    assert _weights_equal(tk.weights(VisionLanguageModel.from_pretrained(run_dir / "model")), expected)
    assert _metric_steps(run_dir) == list(range(1, KILL_STEPS + 1))
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name or ".old-" in p.name]
