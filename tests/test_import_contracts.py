"""The package's layering holds: import-linter checks the contracts in pyproject.toml (cli ->
workflows -> model -> registry -> parts -> layers/kernels -> config, no cycles) on this checkout.

import-linter runs in a child process: its CLI calls ``logging.config.dictConfig`` with the
default ``disable_existing_loggers=True``, which would silence every ``minivlm`` logger for the
rest of a pytest worker (tests that read log records then see none)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_LINT = """
import sys
from importlinter.cli import lint_imports
sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))
"""


def test_import_contracts_are_kept():
    pytest.importorskip("importlinter.cli", reason="import-linter is a dev dependency (pip install -e .[dev])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _LINT, os.fspath(ROOT / "pyproject.toml")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "0 broken" in report and "KEPT" in report


def test_the_package_loggers_are_still_enabled_in_this_process():
    """Guards the reason above: nothing run in-process by the suite disabled our loggers."""
    import logging

    import minivlm.train.checkpoint  # noqa: F401  (creates its logger)

    assert not logging.getLogger("minivlm.train.checkpoint").disabled


def test_no_module_holds_more_than_one_idea_by_size():
    """One idea per file: no module over 500 lines but the Triton kernel (issue 15)."""
    allowed = {"minivlm/kernels/triton_attention.py"}
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "minivlm").rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert set(long) <= allowed, long
