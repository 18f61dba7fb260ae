"""Crash-safe training checkpoints.

Layout of a run directory::

    runs/<name>/checkpoints/step_000200/   model (config.json, model.safetensors, tokenizer) +
                                           checkpoint.json (run id, step) +
                                           trainer_state.pt (optimizer, schedule position,
                                           scaler, RNG, data position, counters, run id)

A checkpoint is written under a temporary name, flushed to disk, and renamed into place, so a
crash mid-write never leaves a directory that looks complete (``trainer_state.pt`` is written
last and marks a complete checkpoint); only the newest ``keep`` of the run survive. Each
checkpoint records the id of the run that wrote it (:mod:`minivlm.train.run_dir`): clean-up and
pruning touch only the run's own checkpoints and temporaries. Resuming reads the newest
checkpoint that loads completely (:func:`load_intact_checkpoint`) and says which newer ones it
skipped and why. ``trainer_state.pt`` holds only tensors and plain containers and is read back
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import datetime
import logging
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minivlm.io_atomic import atomic_write_json, fsync_dir, fsync_tree, raise_write_failure

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"
MARKER_NAME = "checkpoint.json"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp_step_"
#: A temporary's name: ``.tmp_step_<step>[.<run id>][.old]`` (no run id: written before run ids).
_TMP_NAME = re.compile(r"^\.tmp_step_\d+(?:_old)?(?:\.(?P<run>[^.]+))?(?:\.old)?$")


class CheckpointError(ValueError):
    """A checkpoint (or every checkpoint of a run) cannot be read; the message names the files."""


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


def checkpoint_run_id(checkpoint_dir: str | Path) -> str | None:
    """The id of the run that wrote a checkpoint (None: written before run ids, or unreadable)."""
    from minivlm.train.run_dir import read_run_id

    return read_run_id(checkpoint_dir, MARKER_NAME)


def checkpoint_dirs(run_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints of a run, oldest first.

    With ``run_id``, only that run's (and those written before run ids existed, which belong to
    whichever run owns the directory).
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_NAME).is_file()]
    dirs = [p for _, p in sorted(found)]
    if run_id is not None:
        dirs = [p for p in dirs if checkpoint_run_id(p) in (run_id, None)]
    return dirs


def latest_checkpoint(run_dir: str | Path, run_id: str | None = None) -> Path | None:
    dirs = checkpoint_dirs(run_dir, run_id)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: str | Path, step: int, model_state_writer: Callable[[Path], None],
                    trainer_state: dict[str, Any], keep: int, run_id: str | None = None) -> Path:
    """Write ``checkpoints/step_<step>`` atomically and prune all but the newest ``keep`` (0: keep all).

    ``model_state_writer(dir)`` writes the model files into ``dir``. If it (or anything else)
    fails, the temporary directory is removed and the error propagates; the previous
    checkpoints are untouched. With ``run_id`` the checkpoint records it, and clean-up and
    pruning touch only that run's checkpoints and temporaries (the caller holds the run
    directory's lock, :mod:`minivlm.train.run_dir`).
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0 (0 keeps every checkpoint); got {keep}")
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):  # left by a process of this run killed mid-write
        m = _TMP_NAME.match(stale.name)
        if m and (run_id is None or m.group("run") in (run_id, None)):
            shutil.rmtree(stale, ignore_errors=True)
    tag = f".{run_id}" if run_id else ""
    final = root / f"step_{step:06d}"
    tmp = root / f"{_TMP_PREFIX}{step:06d}{tag}"
    try:
        tmp.mkdir()
        model_state_writer(tmp)
        atomic_write_json(tmp / MARKER_NAME, {"run_id": run_id, "step": step,
                                               "saved": datetime.datetime.now().astimezone().isoformat()})
        with open(tmp / STATE_NAME, "wb") as f:  # a file object: a full disk surfaces as its OSError
            torch.save(trainer_state, f)
        fsync_tree(tmp)
        if final.exists():
            # Re-saving a step: rename() cannot replace a non-empty directory, so retire the old
            # copy under a temporary name (a crash in between leaves the older steps as latest).
            retired = root / f"{_TMP_PREFIX}{step:06d}{tag}.old"
            final.rename(retired)
            tmp.rename(final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_dir(root)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_write_failure(final, err)
    if keep > 0:
        for old in checkpoint_dirs(run_dir, run_id)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def load_trainer_state(checkpoint_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The trainer state of a checkpoint.

    Raises:
        FileNotFoundError: ``checkpoint_dir`` has no ``trainer_state.pt``.
        CheckpointError: it cannot be read (corrupt, truncated, or not made by minivlm).
    """
    path = Path(checkpoint_dir) / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a training checkpoint: {STATE_NAME} is missing")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError, EOFError, RuntimeError (zip), ... for a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} ({path.stat().st_size} bytes) cannot be read: corrupt or truncated "
                              f"({first})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a trainer state (a dict); got {type(state).__name__}")
    return state


@dataclass
class IntactCheckpoint:
    """A checkpoint every file of which was read back: what resuming needs, already loaded."""

    path: Path
    config: Any  # VLMConfig
    processor: Any  # Processor
    model_state: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.trainer_state.get("step", -1))


def read_checkpoint(checkpoint_dir: str | Path) -> IntactCheckpoint:
    """Read every file of a checkpoint back (config, processor, weights, trainer state).

    Whether the weights fit the model is checked when they are loaded into it (the trainer's
    model may carry LoRA adapters the config alone does not describe).

    Raises:
        FileNotFoundError, CheckpointError, ConfigError, WeightsFileError, ValueError: a file is
            missing or unreadable (each message names the file).
    """
    from minivlm.config import VLMConfig
    from minivlm.safetensors_io import load_safetensors
    from minivlm.text.processor import Processor

    directory = Path(checkpoint_dir)
    trainer_state = load_trainer_state(directory)
    config = VLMConfig.from_json(directory / "config.json")
    processor = Processor.from_pretrained(directory)
    model_state = load_safetensors(directory / "model.safetensors")
    return IntactCheckpoint(directory, config, processor, model_state, trainer_state)


def load_intact_checkpoint(run_dir: str | Path, run_id: str | None = None) -> IntactCheckpoint | None:
    """The newest checkpoint of the run that reads back completely; None when there is none.

    A newer checkpoint that does not (a damaged file, a disk that filled up) is skipped with a
    warning saying why, and the next older one is tried.

    Raises:
        CheckpointError: checkpoints exist but none of them is intact (every reason listed).
    """
    dirs = checkpoint_dirs(run_dir, run_id)
    reasons = []
    for directory in reversed(dirs):
        try:
            found = read_checkpoint(directory)
        except (OSError, ValueError, RuntimeError) as err:
            reason = " ".join(str(err).split())
            log.warning("skipping checkpoint %s: %s", directory, reason)
            reasons.append(f"{directory.name}: {reason}")
            continue
        if reasons:
            log.warning("resuming from %s, the newest intact checkpoint (%d newer skipped)", directory, len(reasons))
        return found
    if reasons:
        raise CheckpointError(f"no intact checkpoint in {Path(run_dir) / CHECKPOINTS_DIR} to resume from: "
                              + "; ".join(reasons))
    return None
