"""Execute the notebooks top to bottom and store them with their outputs (plots and images).

Run from the repository root after changing a notebook or what it shows::

    python notebooks/execute.py [NAME ...]     # default: every notebook but smolvlm_usage

Each notebook runs in a fresh kernel in a temporary directory (what it writes is thrown away),
one thread per kernel, and is written back atomically. ``tests/test_notebooks.py`` executes them
again and checks that the stored copies carry outputs and pictures.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent
#: Notebooks stored executed; smolvlm_usage is kept without outputs by its owner.
EXECUTED = ("architecture", "train_tiny_vlm", "vlm_usage", "ablation")


def execute(path: Path) -> float:
    notebook = nbformat.read(path, as_version=4)
    os.environ["OMP_NUM_THREADS"] = "1"
    # The kernel imports minivlm from this checkout, not from wherever the package is installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NOTEBOOK_DIR.parent), os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": workdir}}).execute()
    seconds = time.perf_counter() - start
    temporary = path.with_suffix(".ipynb.tmp")
    nbformat.write(notebook, temporary)
    os.replace(temporary, path)
    return seconds


def main(names: list[str]) -> int:
    for name in names or EXECUTED:
        print(f"{name}: {execute(NOTEBOOK_DIR / f'{name}.ipynb'):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
