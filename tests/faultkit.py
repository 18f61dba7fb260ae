"""Fault injection for the tests: forked processes, kill -9, and tiny or read-only file systems.

* :func:`in_child` runs a function in a forked copy of the test process (torch and the test's
  fixtures already loaded, so a child starts in milliseconds) and returns what it returned.
* :func:`start_child` forks one to kill (``os.kill(pid, SIGKILL)``) at a chosen moment.
* :func:`in_tmpfs` runs a function in a forked child that has its own mount namespace with a
  tiny (``size_kib``) or read-only tmpfs; the test is skipped cleanly where the machine does not
  let an unprivileged process create user and mount namespaces.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest

CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_RDONLY, MS_REMOUNT, MS_REC, MS_PRIVATE = 1, 32, 16384, 1 << 18


class ChildFailed(AssertionError):
    """The forked function raised; the message carries its traceback."""


def _child_main(write_fd: int, fn: Callable[..., Any], args: tuple) -> None:
    """Run in the child: never returns (``os._exit``), so pytest's own code never runs twice."""
    code = 0
    try:  # no torch.set_num_threads here: a thread pool would forbid a new user namespace (in_tmpfs)
        payload = {"ok": fn(*args)}
    except BaseException as err:  # report everything to the parent
        payload = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        code = 1
    try:
        os.write(write_fd, json.dumps(payload, default=str).encode())
    finally:
        os._exit(code)


def start_child(fn: Callable[..., Any], *args: Any) -> tuple[int, int]:
    """Fork; the child runs ``fn(*args)``. Returns ``(pid, read end of its result pipe)``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child_main(write_fd, fn, args)
    os.close(write_fd)
    return pid, read_fd


def wait_child(pid: int, read_fd: int, timeout: float = 120.0) -> tuple[int, dict[str, Any]]:
    """``(exit status or -signal, the child's report)``; kills the child after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
            raise AssertionError(f"child {pid} did not finish within {timeout} s")
        time.sleep(0.01)
    chunks = []
    while chunk := os.read(read_fd, 1 << 16):
        chunks.append(chunk)
    os.close(read_fd)
    report = json.loads(b"".join(chunks)) if chunks else {}
    code = os.waitstatus_to_exitcode(status)
    return code, report


def in_child(fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> Any:
    """``fn(*args)`` run in a forked child; its return value (JSON round trip), or ChildFailed."""
    code, report = wait_child(*start_child(fn, *args), timeout=timeout)
    if "error" in report:
        raise ChildFailed(f"{report['error']}\n{report['traceback']}")
    if code != 0:
        raise ChildFailed(f"child exited with {code}")
    return report.get("ok")


def kill9(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _mount_tmpfs(target: Path, size_kib: int, readonly: bool) -> str | None:
    """In a fresh child: new user + mount namespace, a tmpfs on ``target``. None or why not."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWNS | CLONE_NEWUSER) != 0:
        return f"unshare: {os.strerror(ctypes.get_errno())}"
    try:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    except OSError as err:
        return f"uid_map: {err}"
    libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)  # keep the mount out of the parent
    options = f"size={size_kib}k".encode()
    if libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs", 0, options) != 0:
        return f"mount: {os.strerror(ctypes.get_errno())}"
    if readonly and libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs", MS_REMOUNT | MS_RDONLY, options) != 0:
        return f"remount read-only: {os.strerror(ctypes.get_errno())}"
    return None


def _in_namespace(target: str, size_kib: int, readonly: bool, prepare: Callable[[Path], Any] | None,
                  fn: Callable[[Path], Any]) -> Any:
    path = Path(target)
    why = _mount_tmpfs(path, size_kib, readonly=False)
    if why is not None:
        return {"skip": why}
    if prepare is not None:
        prepare(path)
    if readonly:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", MS_REMOUNT | MS_RDONLY, f"size={size_kib}k".encode()) != 0:
            return {"skip": f"remount read-only: {os.strerror(ctypes.get_errno())}"}
    return {"result": fn(path)}


def in_tmpfs(fn: Callable[[Path], Any], size_kib: int = 1024, readonly: bool = False,
             prepare: Callable[[Path], Any] | None = None, timeout: float = 120.0) -> Any:
    """``fn(mount point)`` in a forked child whose mount point is a fresh tmpfs of ``size_kib``
    KiB (``prepare(mount point)`` runs first, before a ``readonly`` remount). Skips the test
    when mounting is not permitted here."""
    if not hasattr(os, "fork") or not Path("/proc/self/uid_map").exists():
        pytest.skip("needs Linux user and mount namespaces")
    target = tempfile.mkdtemp(prefix="minivlm-tmpfs-")
    try:
        outcome = in_child(_in_namespace, target, size_kib, readonly, prepare, fn, timeout=timeout)
    finally:
        os.rmdir(target)
    if "skip" in outcome:
        pytest.skip(f"cannot mount a tmpfs here ({outcome['skip']})")
    return outcome["result"]
