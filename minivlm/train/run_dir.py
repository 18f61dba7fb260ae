"""A run directory belongs to one run, written by one process at a time.

``runs/<name>/`` holds one training run: its checkpoints, ``metrics.jsonl``, the final ``model/``,
``eval.json`` and ``train_result.json``. Two rules keep what is in it trustworthy:

* **One writer.** A process that writes the directory holds an exclusive ``flock`` on
  ``runs/<name>/.lock`` (``fcntl.flock``, released by the kernel when the process exits or is
  killed, so a crash never leaves a stale lock). The lock file records who holds it (pid, host,
  start time, run id, command); a second writer fails at once with :class:`RunDirectoryLocked`
  naming them. Inside one process the lock is shared and counted, so a recipe and the trainer
  it creates hold it together.
* **One run.** ``run.json`` records the run's id (written when the run starts); every checkpoint
  carries it (:mod:`minivlm.train.checkpoint`), and clean-up and pruning touch only that run's
  files. A new run refuses a directory that already holds a run (:data:`RUN_ARTIFACTS`) unless it
  is told to ``resume`` it or to ``overwrite`` it, which deletes only those files (anything else a
  user keeps there is left alone).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from minivlm.io_atomic import atomic_write_json, atomic_write_text

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process lock (documented in the README)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
RUN_FILE = "run.json"
#: What a run writes into its directory; ``--overwrite`` deletes exactly these.
RUN_ARTIFACTS = ("checkpoints", "model", "metrics.jsonl", "eval.json", "train_result.json", "loss.png",
                 "tensorboard", "adapters.safetensors", RUN_FILE)
#: Of those, the ones that mean "a run happened here" (plots and event logs are derived).
_RUN_CONTENT = ("checkpoints", "model", "metrics.jsonl", "eval.json", "train_result.json", "adapters.safetensors")


class RunDirectoryError(ValueError):
    """The run directory cannot be used as asked (not writable, or it holds another run)."""


class RunDirectoryLocked(RunDirectoryError):
    """Another process is writing the run directory."""


class _ProcessLock:
    """One ``flock`` per directory per process, shared by every :class:`RunDirectory` on it."""

    held: dict[Path, "_ProcessLock"] = {}
    guard = threading.Lock()

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd, self.count = path, fd, 0

    @classmethod
    def forget_inherited(cls) -> None:
        """In a forked child: the parent's locks are not the child's. Closing the inherited
        descriptors leaves the parent's lock in place (a flock lives while any descriptor of its
        open file does) and lets it end with the parent, whatever the child does."""
        for lock in cls.held.values():
            fd, lock.fd = lock.fd, None  # a handle released in the child then closes nothing
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        cls.held = {}
        cls.guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ProcessLock.forget_inherited)


class RunDirectory:
    """The handle of a run directory a process writes. Create with :meth:`acquire`.

    Attributes:
        path: the directory.
        run_id: the run's id (``run.json``); set by :meth:`begin`, or read / created lazily.
    """

    def __init__(self, path: Path, lock: _ProcessLock | None, writer: bool = True):
        self.path = path
        self.writer = writer
        self._lock = lock
        self._run_id: str | None = None
        self.begun = False

    # ---- the lock ------------------------------------------------------------------------------
    @classmethod
    def acquire(cls, path: str | Path, writer: bool = True) -> "RunDirectory":
        """Create ``path`` if needed, check it is writable, and take its lock.

        ``writer=False`` (ranks other than 0 of a process group) returns a handle without a lock.

        Raises:
            RunDirectoryError: the directory cannot be created or written.
            RunDirectoryLocked: another process holds the lock.
        """
        path = Path(path)
        if not writer:
            return cls(path, None, writer=False)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write_test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise RunDirectoryError(f"output directory {path} is not writable: {err}") from err
        return cls(path, _take_lock(path))

    def release(self) -> None:
        """Give up this handle's share of the lock (the lock goes when the last share does)."""
        lock, self._lock = self._lock, None
        if lock is None:
            return
        with _ProcessLock.guard:
            lock.count -= 1
            if lock.count == 0:
                _ProcessLock.held.pop(lock.path, None)
                if lock.fd is not None:
                    os.close(lock.fd)  # closing the descriptor releases the flock

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- which run ----------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        """The run's id: from ``run.json``, or a new one recorded there (a handle used without
        :meth:`begin`, e.g. ``Trainer.save()`` called directly)."""
        if self._run_id is None:
            self._run_id = read_run_id(self.path) or (self._record_new_run() if self.writer else "")
        return self._run_id

    def begin(self, resume: bool = False, overwrite: bool = False) -> str:
        """Start (``resume=False``) or continue (``resume=True``) the run of this directory.

        A new run needs a directory without another run's files, or ``overwrite=True``, which
        deletes them first. Calling it again on the same handle does nothing. Returns the run id.

        Raises:
            RunDirectoryError: a new run into a directory that holds a run.
        """
        if not self.writer:  # ranks other than 0 write nothing
            self.begun = True
            return ""
        if self.begun:
            return self.run_id
        if overwrite:
            removed = remove_run_artifacts(self.path)
            if removed:
                log.warning("--overwrite: removed %s from %s", ", ".join(removed), self.path)
        elif not resume:
            content = run_content(self.path)
            if content:
                raise RunDirectoryError(
                    f"{self.path} already holds a run ({describe_content(self.path, content)}); "
                    f"pass --resume to continue it, --overwrite to replace it, or choose another --out")
        if resume and not overwrite:
            # A directory without run.json (checkpoints copied in, or written before run ids)
            # continues the run of its newest checkpoint.
            self._run_id = read_run_id(self.path) or self._record_new_run(newest_checkpoint_run_id(self.path))
        else:
            # Leftovers of a run that never wrote anything lasting (plots, event logs) go too.
            remove_run_artifacts(self.path)
            self._run_id = self._record_new_run()
        self.begun = True
        self._write_holder()
        return self._run_id

    def _record_new_run(self, run_id: str | None = None) -> str:
        run_id = run_id or f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"
        atomic_write_json(self.path / RUN_FILE, {"run_id": run_id, "created": _now(), "host": socket.gethostname(),
                                                 "pid": os.getpid()})
        return run_id

    def _write_holder(self) -> None:
        if self._lock is not None and self._lock.fd is not None:
            _write_holder(self._lock.fd, self._run_id)


def collectively(dist: Any, action: Any, what: Any) -> Any:
    """``action()`` on every rank of ``dist`` (a :class:`~minivlm.train.distributed.DistributedContext`);
    a :class:`RunDirectoryError` on one rank is raised on all, so no rank trains alone."""
    error: RunDirectoryError | None = None
    result = None
    try:
        result = action()
    except RunDirectoryError as err:
        error = err
    (failed,) = dist.any_rank(error is not None)
    if failed:
        raise error if error is not None else RunDirectoryError(f"another rank could not use {what}")
    return result


def claim(path: str | Path, dist: Any, *, resume: bool = False, overwrite: bool = False) -> RunDirectory:
    """Lock ``path`` (rank 0 writes it) and start or continue its run (:meth:`RunDirectory.begin`),
    before any compute; the caller releases the handle."""
    run = collectively(dist, lambda: RunDirectory.acquire(path, writer=dist.is_main), path)
    try:
        collectively(dist, lambda: run.begin(resume=resume, overwrite=overwrite), path)
    except BaseException:
        run.release()
        raise
    return run


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _take_lock(path: Path) -> _ProcessLock:
    key = path.resolve()
    with _ProcessLock.guard:
        lock = _ProcessLock.held.get(key)
        if lock is None:
            lock = _ProcessLock(key, _flock(path))
            _ProcessLock.held[key] = lock
        lock.count += 1
        return lock


def _flock(path: Path) -> int | None:
    if fcntl is None:
        log.warning("no fcntl on this platform: %s is not protected against a second writer", path)
        return None
    lock_path = path / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        raise RunDirectoryLocked(f"{path} is being written by another process ({holder_text(lock_path)}); "
                                 f"wait for it to finish or stop it, or choose another --out") from err
    _write_holder(fd, None)
    return fd


def _write_holder(fd: int, run_id: str | None) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(), "run_id": run_id,
            "command": " ".join(sys.argv)[:500]}
    data = json.dumps(info).encode()
    os.pwrite(fd, data, 0)  # then cut what a longer previous line left: never an empty file
    os.ftruncate(fd, len(data))


def holder(lock_path: str | Path) -> dict[str, Any] | None:
    """What the lock file says about its holder (None when unreadable)."""
    try:
        return json.loads(Path(lock_path).read_text())
    except (OSError, ValueError):
        return None


def holder_text(lock_path: str | Path) -> str:
    info = None
    for _ in range(40):  # the holder may be between taking the lock and writing its line
        info = holder(lock_path)
        if info:
            break
        time.sleep(0.025)
    if not info:
        return "holder unknown"
    run = f", run {info['run_id']}" if info.get("run_id") else ""
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}{run}"


def newest_checkpoint_run_id(path: str | Path) -> str | None:
    """The run id recorded by the newest checkpoint in ``path`` (None: none, or none recorded)."""
    from minivlm.train.checkpoint import checkpoint_dirs, checkpoint_run_id

    dirs = checkpoint_dirs(path)
    return checkpoint_run_id(dirs[-1]) if dirs else None


def read_run_id(path: str | Path, file: str = RUN_FILE) -> str | None:
    """The run id recorded in ``path/run.json`` (or another JSON ``file`` there, e.g. a checkpoint's
    ``checkpoint.json``); None when there is none or it is unreadable."""
    try:
        value = json.loads((Path(path) / file).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def run_content(path: str | Path) -> list[str]:
    """The run files in ``path`` that mean a run already happened there (empty: none)."""
    path = Path(path)
    found = []
    for name in _RUN_CONTENT:
        p = path / name
        if name == "checkpoints":
            if p.is_dir() and any(c.name.startswith("step_") for c in p.iterdir()):
                found.append(name)
        elif p.is_dir() or (p.is_file() and p.stat().st_size > 0):
            found.append(name)
    return found


def describe_content(path: Path, content: list[str]) -> str:
    """E.g. ``"run 20261127-101500-1a2b3c4d: checkpoints up to step 20, model/, metrics.jsonl"``."""
    parts = []
    for name in content:
        if name == "checkpoints":
            steps = sorted(int(c.name[5:]) for c in (path / name).iterdir()
                           if c.name.startswith("step_") and c.name[5:].isdigit())
            parts.append(f"checkpoints up to step {steps[-1]}" if steps else "checkpoints")
        else:
            parts.append(name + ("/" if (path / name).is_dir() else ""))
    run_id = read_run_id(path)
    return (f"run {run_id}: " if run_id else "") + ", ".join(parts)


def remove_run_artifacts(path: str | Path) -> list[str]:
    """Delete the run's own files (:data:`RUN_ARTIFACTS`) from ``path``; returns their names."""
    path = Path(path)
    removed = []
    for name in RUN_ARTIFACTS:
        p = path / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    for leftover in path.glob(".model.*"):  # temporaries / backups of an interrupted final save
        shutil.rmtree(leftover, ignore_errors=True)
    return removed


def trim_metrics(path: str | Path, step: int) -> int:
    """Keep the records of ``metrics.jsonl`` up to ``step``: a resumed run rewrites the later ones.

    A line that is not a JSON record (the torn last line of a process killed mid-write) is
    dropped with a warning instead of blocking the resume. Rewritten atomically. Returns the
    number of records dropped.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            keep = record["step"] <= step
        except (ValueError, KeyError, TypeError):
            log.warning("%s:%d is not a complete record (torn by a crash?): dropped", path, number)
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped
