"""Crash-safe training checkpoints.

Layout of a run directory::

    runs/<name>/checkpoints/step_000200/   model (config.json, model.safetensors, tokenizer) +
                                           trainer_state.pt (optimizer, schedule position,
                                           scaler, RNG, data position, counters)

A checkpoint is written under a temporary name, flushed to disk, and renamed into place, so a
crash mid-write never leaves a directory that looks complete (``trainer_state.pt`` is written
last and marks a complete checkpoint); only the newest ``keep`` survive.
``trainer_state.pt`` holds only tensors and plain containers and is read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp_step_"


def rng_state() -> dict[str, Any]:
    """Every global RNG a training step may draw from: torch (CPU and CUDA), Python, NumPy.

    NumPy's state is stored as plain lists: ``weights_only`` loading refuses ndarrays.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _python_state_to_list(random.getstate()),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_python_state_from_list(state["python"]))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_list(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: str | Path, step: int, model_state_writer: Callable[[Path], None],
                    trainer_state: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step_<step>`` atomically and prune all but the newest ``keep`` (0: keep all).

    ``model_state_writer(dir)`` writes the model files into ``dir``. If it (or anything else)
    fails, the temporary directory is removed and the error propagates; the previous
    checkpoints are untouched.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0 (0 keeps every checkpoint); got {keep}")
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"{_TMP_PREFIX}{step:06d}"
    try:
        tmp.mkdir()
        model_state_writer(tmp)
        torch.save(trainer_state, tmp / STATE_NAME)
        _fsync_tree(tmp)
        if final.exists():
            # Re-saving a step: rename() cannot replace a non-empty directory, so retire the old
            # copy under a temporary name (a crash in between leaves the older steps as latest).
            retired = root / f"{_TMP_PREFIX}{step:06d}_old"
            final.rename(retired)
            tmp.rename(final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def _fsync_tree(directory: Path) -> None:
    """Flush every file of ``directory`` to disk, so the rename cannot outrun the data."""
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_trainer_state(checkpoint_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(checkpoint_dir) / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a training checkpoint: {STATE_NAME} is missing")
    return torch.load(path, map_location=map_location, weights_only=True)
