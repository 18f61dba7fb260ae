"""Which code produced a result: the git commit of the minivlm source tree a process runs.

A number is reproducible by a command only together with the code the command ran; run records
(``run_info.json`` of an ablation, the benchmarks' environment block) carry this next to the date
and the machine.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def source_commit(path: Path = PACKAGE_DIR) -> str | None:
    """The short commit of the git checkout holding ``path`` (the minivlm package by default),
    with ``+dirty`` when tracked files under ``path`` differ from it; None outside a git checkout
    or without git, and None when the checkout does not track ``path`` (a wheel installed into a
    virtual environment that happens to sit inside some project's repository)."""
    try:
        tracked = subprocess.run(["git", "ls-files", "--", "."], cwd=path, capture_output=True, text=True, timeout=10)
        if tracked.returncode != 0 or not tracked.stdout.strip():
            return None
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=path,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")
