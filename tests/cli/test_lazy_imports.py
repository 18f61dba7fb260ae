"""``minivlm --help`` starts fast: the CLI package and the listing import no torch (issue 18).

Checked through ``sys.modules`` in a fresh interpreter, so the result does not depend on timing.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "numpy", "PIL", "transformers")


def modules_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_importing_the_cli_imports_no_torch():
    assert modules_after("import minivlm.cli") == set()


def test_top_level_help_imports_no_torch():
    code = ("import contextlib, io\nfrom minivlm.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try: main(['--help'])\n    except SystemExit: pass\n"
            "assert 'retrieve' in out.getvalue() and 'export' in out.getvalue()")
    assert modules_after(code) == set()


def test_the_package_serves_the_model_on_first_use():
    assert "torch" in modules_after("import minivlm\nminivlm.VisionLanguageModel")
    assert modules_after("import minivlm\nminivlm.preset('tiny')") == set()


@pytest.mark.parametrize("argv", [["export", "--help"], ["-v", "eval", "--help"], ["chat", "--help"]])
def test_a_chosen_subcommand_gets_its_full_parser(argv, capsys):
    from minivlm.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: minivlm {argv[-2]}") and ("--model" in out or "--out" in out)


def test_unknown_attribute_of_the_package_is_an_attribute_error():
    import minivlm

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        minivlm.Nope  # noqa: B018
