"""README.md's Python snippets run as pasted (issue 18).

Each ```python block runs in a fresh namespace, in a temporary working directory. A snippet that
says it reads the ``make demo`` model (``runs/tiny/model``) finds one there: the test writes it
with ``minivlm.build`` (random weights), since training it takes minutes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs_as_pasted(index, tmp_path, monkeypatch):
    import minivlm

    code = SNIPPETS[index]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    if "runs/tiny/model" in code:
        model, _ = minivlm.build("tiny")
        model.save_pretrained("runs/tiny/model")
    exec(compile(code, f"README.md snippet {index + 1}", "exec"), {"__name__": "__readme__"})
    assert os.getcwd() == str(tmp_path)
