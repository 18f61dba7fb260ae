"""The notebooks run top to bottom as a reader would run them (nbclient, a real kernel), draw
pictures, and are stored executed, with those pictures, so a reader sees them before running
anything (``python notebooks/execute.py`` re-executes and stores them); ``smolvlm_usage`` is
stored without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXECUTED = ("architecture", "train_tiny_vlm", "vlm_usage", "ablation")  # as notebooks/execute.py stores


def test_the_five_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} == {"architecture", "train_tiny_vlm", "vlm_usage", "ablation", "smolvlm_usage"}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_draws(path, tmp_path, monkeypatch):
    # One thread per kernel: other tests (or xdist workers) share the cores, and OpenMP threads
    # spinning on a busy machine slow a two-thread kernel down several times.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The kernel imports minivlm from this checkout, not from wherever the package is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOK_DIR.parent),
                                                                   os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) >= 2, f"{path.name} should show its results as pictures"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem not in EXECUTED], ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip its outputs"


@pytest.mark.parametrize("name", EXECUTED)
def test_notebook_is_stored_executed_with_its_pictures(name):
    notebook = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    # Executed top to bottom in one kernel: every code cell ran, in order.
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), \
        f"{name}: run python notebooks/execute.py {name}"
    outputs = [o for cell in code for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2, f"{name}: its pictures are not stored"
