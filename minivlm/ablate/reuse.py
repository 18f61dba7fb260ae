"""Runs one sweep can take from another: the same training and evaluation under another name.

Grids that change one axis at a time from the same base share that base: the main job's own
configuration is the baseline of the projector grid and the ``base`` variant of the encoder and
training grid. Training it again under a second name would cost a whole run per seed (~20
minutes on the 2-core machine) to reproduce numbers already on disk, since a run is a
deterministic function of its config, seed and evaluation budget. A grid that names another
sweep's output directory (``reuse_runs_from``) copies each finished run there whose config equals
one of its own runs' in everything but the run's name, and whose grid evaluated as many test
samples; the copy records where it came from (``reused.json``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from minivlm.ablate.grid import GRID_FILE, AblationGrid, GridError
from minivlm.ablate.results import REUSED_FILE, is_finished
from minivlm.io_atomic import atomic_write_json

log = logging.getLogger(__name__)

#: What is never copied: training state that only served resumption.
NOT_COPIED = ("checkpoints",)


def config_key(config) -> str:
    """A config as canonical JSON without its name: two runs with equal keys train alike."""
    fields: dict[str, Any] = json.loads(config.to_json())
    fields.pop("name", None)
    return json.dumps(fields, sort_keys=True)


def reusable_runs(grid: AblationGrid, plans: list, source_dir: str | Path) -> dict[Path, Path]:
    """``{run_dir of a plan: its twin's run directory in source_dir}`` for every plan with a twin.

    ``plans`` are :func:`~minivlm.ablate.run.plan_runs` entries of ``grid``. The source sweep's
    grid is read from its ``grid.json``; its runs are matched by :func:`config_key`, and only when
    both grids evaluate the same number of test samples (``eval_limit``). A twin belongs to the
    source sweep whether or not it has finished yet: which runs this sweep trains then depends on
    the two grids alone, so its shards deal them out alike whenever each starts.

    Raises:
        GridError: ``source_dir`` holds no sweep (no ``grid.json``), or it is this sweep's own.
    """
    from minivlm.ablate.run import plan_runs

    source_dir = Path(source_dir)
    if not (source_dir / GRID_FILE).is_file():
        raise GridError(f"reuse_runs_from: {source_dir} holds no ablation sweep (no {GRID_FILE}); "
                        f"expected the --out directory of another grid's runs")
    source = AblationGrid.from_dict(json.loads((source_dir / GRID_FILE).read_text()), str(source_dir / GRID_FILE))
    if source.eval_limit != grid.eval_limit:
        log.warning("reuse_runs_from %s: its runs evaluated eval_limit=%s test samples, this grid %s; "
                    "nothing reused", source_dir, source.eval_limit, grid.eval_limit)
        return {}
    theirs = {config_key(p.config): p.run_dir for p in plan_runs(source, source_dir) if p.config is not None}
    found = {}
    for plan in plans:
        twin = theirs.get(config_key(plan.config)) if plan.config is not None else None
        if twin is not None:
            if twin.resolve() == plan.run_dir.resolve():
                raise GridError(f"reuse_runs_from: {source_dir} is this sweep's own output directory")
            found[plan.run_dir] = twin
    return found


def copy_run(source: Path, run_dir: Path) -> bool:
    """Copy the finished run ``source`` to ``run_dir`` (all but its checkpoints) in one rename.

    A partial run already in ``run_dir`` (an interrupted attempt at the same training) is
    replaced; a finished one is kept, and an unfinished ``source`` is left for a later call (the
    source sweep trains it). Returns whether this call copied. Two shards of a sweep may copy the
    same run at once: each builds its own copy and only one lands.
    """
    if is_finished(run_dir):
        return False
    if not is_finished(source):
        log.warning("%s is to be copied from %s, which has not finished yet: run this sweep again once it has",
                    run_dir, source)
        return False
    staging = run_dir.with_name(f".reuse.{run_dir.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns(*NOT_COPIED))
    atomic_write_json(staging / REUSED_FILE, {
        "from": str(source), "why": "the same config (but for its name), seed and evaluation budget"})
    if is_finished(run_dir):  # the other shard landed its copy meanwhile
        shutil.rmtree(staging)
        return False
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, run_dir)
    return True
