"""Which code produced a result: the commit of the checkout holding the package, marked when its
tracked files were edited, and nothing outside git."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from minivlm.provenance import source_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(cwd, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    package = tmp_path / "repo" / "pkg"
    package.mkdir(parents=True)
    (package / "model.py").write_text("x = 1\n")
    git(tmp_path / "repo", "init", "-q")
    git(tmp_path / "repo", "add", ".")
    git(tmp_path / "repo", "commit", "-qm", "first")
    return package


def test_a_clean_checkout_gives_its_short_commit(checkout):
    assert source_commit(checkout) == git(checkout, "rev-parse", "--short", "HEAD")


def test_edited_tracked_files_are_marked_dirty_and_new_results_are_not(checkout):
    (checkout / "results.json").write_text("{}")  # untracked output beside the code: still clean
    assert not source_commit(checkout).endswith("+dirty")
    (checkout / "model.py").write_text("x = 2\n")
    assert source_commit(checkout) == git(checkout, "rev-parse", "--short", "HEAD") + "+dirty"


def test_only_the_package_folder_decides_dirtiness(checkout):
    (checkout.parent / "README.md").write_text("a\n")
    git(checkout.parent, "add", "README.md")
    git(checkout.parent, "commit", "-qm", "readme")
    (checkout.parent / "README.md").write_text("edited\n")  # outside the package
    assert not source_commit(checkout).endswith("+dirty")


def test_outside_a_git_checkout_there_is_no_commit(tmp_path):
    assert source_commit(tmp_path) is None


def test_a_folder_the_checkout_does_not_track_has_no_commit(checkout):
    # e.g. minivlm installed as a wheel into an ignored .venv/ inside another project's repository
    installed = checkout.parent / ".venv" / "site-packages" / "pkg"
    installed.mkdir(parents=True)
    (installed / "model.py").write_text("x = 1\n")
    (checkout.parent / ".gitignore").write_text(".venv/\n")
    assert source_commit(installed) is None
