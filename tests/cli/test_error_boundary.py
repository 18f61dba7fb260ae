"""Every failure the command line can meet is one line on stderr and an exit code, never a traceback,
and nothing a user already had is lost: 2 for bad input, 1 for a failed run, 128 + N for signal N.

The training cases run ``minivlm train`` in-process on a shrunken ``tiny`` (a few seconds each).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import faultkit
import pytest
import torch
from tinykit import TINY_PARTS

from minivlm.cli import main
from minivlm.data import build_dataset
from minivlm.model import VisionLanguageModel
from minivlm.train import checkpoint as ckpt
from minivlm.train.run_dir import LOCK_NAME, RunDirectory, read_run_id

TRAIN = (*TINY_PARTS, "decoder.n_layers=1", "decoder.vocab_size=300", "data.curriculum=", "data.curriculum_steps=0",
         "train.batch_size=4", "train.max_minutes=none", "train.cpu_threads=1", "train.warmup_steps=2",
         "train.precision=fp32", "train.retrieval_weight=0")
QUESTION = "What colour is the shape?"


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def train(capsys, *overrides, options=()) -> tuple[int, str, str]:
    """``minivlm train`` with the tiny settings; ``options`` are the flags (--out, --resume, ...)."""
    return _cli(capsys, "train", *TRAIN, *overrides, "--data", "shapes", "--eval-limit", 4, "--no-progress", *options)


def assert_one_line_error(err: str, command: str, *fragments: str) -> str:
    """stderr holds exactly one error line for ``command``, no traceback; returns that line."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("minivlm ")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"minivlm {command}: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def model_weights(directory: Path) -> dict[str, torch.Tensor]:
    return VisionLanguageModel.from_pretrained(directory).state_dict()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 8-step run (checkpoints at 4 and 8, model/, metrics, eval.json)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *TRAIN, "train.save_every=4", "--data", "shapes", "--steps", "8", "--out", str(run_dir),
                 "--eval-limit", "4", "--no-progress"]) == 0
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns(LOCK_NAME))
    return copy


# ---- the run directory -------------------------------------------------------------------------
def test_a_new_run_into_an_existing_out_is_refused_and_changes_nothing(capsys, run_copy):
    before = snapshot(run_copy)
    code, _, err = train(capsys, "train.save_every=4", "train.seed=7", options=["--steps", 4, "--out", run_copy])
    assert code == 2
    assert_one_line_error(err, "train", f"{run_copy} already holds a run", "checkpoints up to step 8",
                          "--resume", "--overwrite")
    assert snapshot(run_copy) == before


def test_overwrite_replaces_the_old_run_and_resume_continues_it(capsys, run_copy):
    old_id = read_run_id(run_copy)
    (run_copy / "my_notes.txt").write_text("keep me")
    code, out, _ = train(capsys, "train.save_every=2", options=["--steps", 4, "--out", run_copy, "--overwrite"])
    assert code == 0 and "trained 4 steps" in out
    assert read_run_id(run_copy) not in (None, old_id)
    assert [p.name for p in ckpt.checkpoint_dirs(run_copy)] == ["step_000002", "step_000004"]
    assert (run_copy / "my_notes.txt").read_text() == "keep me"
    assert json.loads((run_copy / "train_result.json").read_text())["run_id"] == read_run_id(run_copy)
    # The same command with --resume continues this run (already at its end: saved and scored again).
    code, out, _ = train(capsys, "train.save_every=2", options=["--steps", 4, "--out", run_copy, "--resume"])
    assert code == 0 and "trained 4 steps" in out


def test_resume_refuses_settings_it_cannot_apply(capsys, run_copy):
    before = snapshot(run_copy)
    code, _, err = train(capsys, "train.lr=0.5", options=["--steps", 30, "--out", run_copy, "--resume"])
    assert code == 2
    assert_one_line_error(err, "train", "cannot change train.lr from 0.0005 to 0.5, train.steps from 8 to 30")
    assert snapshot(run_copy) == before


def _hold(run_dir: str, ready: str, release: str) -> None:
    with RunDirectory.acquire(run_dir):
        Path(ready).touch()
        while not os.path.exists(release):
            time.sleep(0.01)


def test_a_run_directory_in_use_is_refused_naming_its_holder(capsys, tmp_path):
    run_dir = tmp_path / "run"
    pid, result = faultkit.start_child(_hold, str(run_dir), str(tmp_path / "ready"), str(tmp_path / "release"))
    try:
        while not (tmp_path / "ready").exists():
            time.sleep(0.01)
        code, _, err = train(capsys, options=["--steps", 2, "--out", run_dir])
    finally:
        (tmp_path / "release").touch()
        faultkit.wait_child(pid, result)
    assert code == 1
    assert_one_line_error(err, "train", f"{run_dir} is being written by another process",
                          f"pid {pid} on {socket.gethostname()} since")


# ---- training that fails -----------------------------------------------------------------------
def _nan_losses(monkeypatch, keep_first: int = 0) -> None:
    """Every training loss non-finite except the first ``keep_first`` forward passes'."""
    original = VisionLanguageModel.loss_sum
    calls = iter(range(10**6))

    def poisoned(self, *args, **kwargs):
        total, count = original(self, *args, **kwargs)
        return (total if self.training and next(calls) < keep_first else total * math.nan), count

    monkeypatch.setattr(VisionLanguageModel, "loss_sum", poisoned)


def test_diverging_training_is_a_failed_run(capsys, monkeypatch, tmp_path):
    _nan_losses(monkeypatch)
    code, _, err = train(capsys, "train.max_nonfinite=2", options=["--steps", 5, "--out", tmp_path / "run"])
    assert code == 1
    assert_one_line_error(err, "train", "2 consecutive steps with a non-finite loss", "train.max_nonfinite=2")


def test_a_run_whose_steps_were_mostly_non_finite_fails_and_writes_no_model(capsys, monkeypatch, tmp_path):
    _nan_losses(monkeypatch, keep_first=1)
    code, out, err = train(capsys, "train.max_nonfinite=100", "train.save_every=0",
                           options=["--steps", 8, "--out", tmp_path / "run"])
    assert code == 1 and "finished" not in out
    assert_one_line_error(err, "train", "training failed: 7 steps were skipped for a non-finite loss")
    assert not (tmp_path / "run" / "model").exists()
    assert json.loads((tmp_path / "run" / "train_result.json").read_text())["status"] == "nonfinite"


def test_sigterm_saves_a_checkpoint_and_exits_143(capsys, monkeypatch, tmp_path):
    def send_sigterm(cfg):
        def evaluate(model):
            os.kill(os.getpid(), signal.SIGTERM)
            return {}
        return evaluate

    monkeypatch.setattr("minivlm.train.recipe.periodic_eval", send_sigterm)
    code, _, err = train(capsys, "train.eval_every=2", options=["--steps", 6, "--out", tmp_path / "run"])
    assert code == 128 + signal.SIGTERM
    assert "training interrupted by SIGTERM at step 2" in err and "--resume" in err and "Traceback" not in err
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_000002"


def test_a_full_disk_during_the_final_save_keeps_the_previous_model(capsys, monkeypatch, run_copy):
    previous = model_weights(run_copy / "model")
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def full_for_the_model(tensors, filename, metadata=None):
        if ".model.tmp-" in str(filename):
            Path(filename).write_bytes(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_for_the_model)
    code, _, err = train(capsys, options=["--out", run_copy, "--resume"])
    assert code == 1
    assert_one_line_error(err, "train", f"could not write {run_copy / 'model'} (disk full",
                          "the previous version is unchanged")
    reloaded = model_weights(run_copy / "model")
    assert reloaded.keys() == previous.keys() and all(torch.equal(reloaded[k], previous[k]) for k in previous)


def test_resume_without_an_intact_checkpoint_names_the_damaged_files(capsys, run_copy):
    for directory in ckpt.checkpoint_dirs(run_copy):
        (directory / ckpt.STATE_NAME).write_bytes(b"\x00" * 10)
    code, _, err = train(capsys, options=["--out", run_copy, "--resume"])
    assert code == 1
    assert_one_line_error(err, "train", "no intact checkpoint", "step_000008/trainer_state.pt (10 bytes) cannot be read",
                          "step_000004")


# ---- bad input files ---------------------------------------------------------------------------
@pytest.fixture
def checkpoint_copy(checkpoint, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(checkpoint, copy)
    return copy


def test_a_config_value_of_the_wrong_type_names_the_field(capsys, checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["decoder"]["n_layers"] = "four"
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    for argv in (["summary", checkpoint_copy], ["chat", "--model", checkpoint_copy, QUESTION]):
        code, _, err = _cli(capsys, *argv)
        assert code == 2
        assert_one_line_error(err, argv[0], f"{checkpoint_copy / 'config.json'}: decoder.n_layers: expected int, "
                                            f"got 'four' (str)")


@pytest.mark.parametrize("name", ["config.json", "processor_config.json"])
def test_invalid_json_names_the_file(capsys, checkpoint_copy, name):
    (checkpoint_copy / name).write_text('{"broken": \n')
    code, _, err = _cli(capsys, "chat", "--model", checkpoint_copy, QUESTION)
    assert code == 2
    assert_one_line_error(err, "chat", f"{checkpoint_copy / name} is not valid JSON")


def test_a_question_that_is_not_utf8_is_refused_before_loading(capsys, checkpoint):
    latin1 = b"caf\xe9?".decode("utf-8", errors="surrogateescape")  # how Python hands over such an argv
    code, out, err = _cli(capsys, "chat", "--model", checkpoint, latin1)
    assert code == 2 and out == ""
    assert_one_line_error(err, "chat", "the question text has byte 0xe9, which is not UTF-8, at character 3")


def test_a_stdin_line_that_is_not_utf8_is_reported_and_the_session_goes_on(capsys, monkeypatch, checkpoint):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9?\nWhat is it?\n"), encoding="utf-8"))
    code, out, err = _cli(capsys, "chat", "--model", checkpoint, "--max-new-tokens", 3, "--json")
    assert code == 2
    assert_one_line_error(err, "chat", "stdin line 1 text has byte 0xe9")
    assert [list(json.loads(line)) for line in out.splitlines()] == [["answer"]]  # line 2 was answered


def _write_jsonl(directory: Path, n: int, bad_line: str | None = None) -> Path:
    data = build_dataset("shapes", "train", seed=0, image_size=48)
    lines = []
    for i in range(n):
        sample = data[i]
        sample["messages"][0]["content"][0]["image"].save(directory / f"{i}.png")
        sample["messages"][0]["content"][0]["image"] = f"{i}.png"
        lines.append(json.dumps({"messages": sample["messages"]}))
    if bad_line is not None:
        lines.insert(2, bad_line)
    path = directory / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_strict_data_turns_a_bad_record_into_an_error_naming_file_and_line(capsys, tmp_path):
    data = _write_jsonl(tmp_path, 12, bad_line='{"messages": 5}')
    spec = f"jsonl:{data}"
    code, _, err = _cli(capsys, "train", *TRAIN, "data.strict=true", "--data", spec, "--steps", 2,
                        "--out", tmp_path / "strict", "--no-progress")
    assert code == 2
    assert_one_line_error(err, "train", f"{data}:3:", "'messages' must be a non-empty list")
    # Without strict the record is skipped (and counted), and the run says it was not evaluated.
    code, out, _ = _cli(capsys, "train", *TRAIN, "--data", spec, "--steps", 2, "--out", tmp_path / "lenient",
                        "--no-progress")
    assert code == 0
    assert f"not evaluated: {spec} (file data has no test split" in out
    assert json.loads((tmp_path / "lenient" / "eval.json").read_text())["not_evaluated"] == [spec]


# ---- anything else -----------------------------------------------------------------------------
def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr("minivlm.summary.summarize", broken)
    code, _, err = _cli(capsys, "summary", "tiny")
    assert code == 1
    assert_one_line_error(err, "summary", "internal error (RuntimeError: something nobody expected)", "--debug")
    code, _, err = _cli(capsys, "--debug", "summary", "tiny")
    assert code == 1 and "Traceback" in err and 'raise RuntimeError("something nobody expected")' in err
