"""Checkpoints are written atomically, pruned to the newest K, and carry every RNG state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import trainkit as tk

from minivlm.model import VisionLanguageModel
from minivlm.train import checkpoint as ckpt
from minivlm.train.trainer import Trainer


def _writer(directory):
    (directory / "model.safetensors").write_bytes(b"weights")


def _names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_only_the_newest_k_checkpoints_are_kept(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, _writer, {"step": step}, keep=2)
    assert _names(tmp_path) == ["step_000003", "step_000004"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000004"
    assert ckpt.load_trainer_state(ckpt.latest_checkpoint(tmp_path)) == {"step": 4}


def test_keep_zero_keeps_every_checkpoint(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, _writer, {"step": step}, keep=0)
    assert len(ckpt.checkpoint_dirs(tmp_path)) == 3
    with pytest.raises(ValueError, match="keep must be >= 0"):
        ckpt.save_checkpoint(tmp_path, 4, _writer, {}, keep=-1)


def test_a_crash_while_writing_leaves_the_previous_checkpoint_as_latest(tmp_path):
    ckpt.save_checkpoint(tmp_path, 10, _writer, {"step": 10}, keep=2)

    def crashing_writer(directory):
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 20, crashing_writer, {"step": 20}, keep=2)
    assert _names(tmp_path) == ["step_000010"]  # no temporary directory left behind
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000010"


def test_leftovers_of_a_killed_writer_are_ignored_then_removed(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _writer, {"step": 1}, keep=3)
    (tmp_path / "checkpoints" / ".tmp_step_000002").mkdir()  # killed mid-write
    (tmp_path / "checkpoints" / "step_000003").mkdir()  # no trainer_state.pt: incomplete
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000001"
    ckpt.save_checkpoint(tmp_path, 4, _writer, {"step": 4}, keep=3)
    assert ".tmp_step_000002" not in _names(tmp_path)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000004"


def test_saving_the_same_step_again_replaces_it(tmp_path):
    ckpt.save_checkpoint(tmp_path, 5, _writer, {"version": 1}, keep=2)
    ckpt.save_checkpoint(tmp_path, 5, _writer, {"version": 2}, keep=2)
    assert _names(tmp_path) == ["step_000005"]
    assert ckpt.load_trainer_state(tmp_path / "checkpoints" / "step_000005") == {"version": 2}


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    ckpt.save_checkpoint(tmp_path, 1, _writer, {"rng": ckpt.rng_state()}, keep=1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    ckpt.set_rng_state(ckpt.load_trainer_state(ckpt.latest_checkpoint(tmp_path))["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_a_missing_trainer_state_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a training checkpoint"):
        ckpt.load_trainer_state(tmp_path)


def test_trainer_checkpoints_are_loadable_models_with_their_processor(tmp_path):
    cfg = tk.config("train.steps=5", "train.save_every=2", "train.keep_checkpoints=2")
    trainer = Trainer(tk.model(cfg), tk.processor(), tk.dataset(), tmp_path, dist=tk.cpu(), progress=False)
    trainer.fit()
    # Periodic saves at 2 and 4, the final step 5 always; only the newest two survive.
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_000004", "step_000005"]
    loaded = VisionLanguageModel.from_pretrained(ckpt.latest_checkpoint(tmp_path))
    assert loaded.processor is not None and loaded.processor.tokenizer.vocab_size == cfg.decoder.vocab_size
    own = trainer.model.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items())
