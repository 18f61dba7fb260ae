"""A run directory belongs to one run and one writing process at a time."""

from __future__ import annotations

import json
import os
import socket
import time

import faultkit
import pytest

from minivlm.train.run_dir import (
    LOCK_NAME,
    RUN_FILE,
    RunDirectory,
    RunDirectoryError,
    RunDirectoryLocked,
    read_run_id,
    trim_metrics,
)


def _hold_lock(run_dir: str, ready_path: str, release_path: str) -> None:
    """Child: take the lock, say so, wait until told to go (or be killed)."""
    with RunDirectory.acquire(run_dir):
        open(ready_path, "w").close()
        while not os.path.exists(release_path):
            time.sleep(0.01)


def _wait_for(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.mark.parametrize("ending", ["exits", "is killed"])
def test_a_second_process_is_refused_naming_the_holder_until_the_first_ends(tmp_path, ending):
    run_dir, ready, release = tmp_path / "run", tmp_path / "ready", tmp_path / "release"
    pid, result = faultkit.start_child(_hold_lock, str(run_dir), str(ready), str(release))
    try:
        _wait_for(ready)
        with pytest.raises(RunDirectoryLocked) as caught:
            RunDirectory.acquire(run_dir)
        message = str(caught.value)
        assert f"pid {pid} on {socket.gethostname()} since " in message and "another process" in message
    finally:
        if ending == "exits":
            release.touch()
        else:
            faultkit.kill9(pid)  # the kernel drops a flock with its process: no stale lock
        faultkit.wait_child(pid, result)
    with RunDirectory.acquire(run_dir) as run:
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert run.path == run_dir


def test_inside_one_process_the_lock_is_shared_until_the_last_handle_goes(tmp_path):
    first = RunDirectory.acquire(tmp_path)
    second = RunDirectory.acquire(tmp_path)  # e.g. the recipe and the trainer it creates
    first.release()
    pid, result = faultkit.start_child(RunDirectory.acquire, str(tmp_path))
    code, report = faultkit.wait_child(pid, result)
    assert code == 1 and report["error"].startswith("RunDirectoryLocked")  # still held by `second`
    second.release()
    assert faultkit.in_child(lambda: RunDirectory.acquire(tmp_path).path.name) == tmp_path.name


def test_a_new_run_refuses_a_directory_that_holds_a_run(tmp_path):
    with RunDirectory.acquire(tmp_path) as run:
        first_id = run.begin()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (tmp_path / "checkpoints" / "step_000001").mkdir(parents=True)
    with RunDirectory.acquire(tmp_path) as run:
        with pytest.raises(RunDirectoryError, match=r"already holds a run \(run .*checkpoints up to step 1, "
                                                    r"metrics.jsonl\); pass --resume .* --overwrite"):
            run.begin()
    assert read_run_id(tmp_path) == first_id  # nothing changed
    with RunDirectory.acquire(tmp_path) as run:
        assert run.begin(resume=True) == first_id


def test_overwrite_deletes_only_the_run_files(tmp_path):
    for name in ("checkpoints/step_000005", "model", "tensorboard"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("metrics.jsonl", "eval.json", "train_result.json", "loss.png", "my_notes.txt"):
        (tmp_path / name).write_text("x")
    with RunDirectory.acquire(tmp_path) as run:
        run.begin(overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK_NAME, RUN_FILE, "my_notes.txt"])


def test_a_torn_last_metrics_line_is_dropped_not_fatal(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "eval": {}}\n{"step": 4, "lo')
    assert trim_metrics(path, 2) == 2
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
