"""The package's layering holds: import-linter checks the contracts in pyproject.toml (cli ->
workflows -> model -> registry -> parts -> layers/kernels -> config, no cycles) on this checkout."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept(monkeypatch, capsys):
    cli = pytest.importorskip("importlinter.cli", reason="import-linter is a dev dependency (pip install -e .[dev])")
    monkeypatch.chdir(ROOT)  # the contracts (pyproject.toml) and the package they check
    monkeypatch.syspath_prepend(str(ROOT))
    status = cli.lint_imports(config_filename=os.fspath(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert status == 0, report
    assert "0 broken" in report and "KEPT" in report
