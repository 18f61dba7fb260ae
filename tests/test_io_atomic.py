"""Atomic writes: a file or directory is replaced whole or not at all, and a failure says so."""

from __future__ import annotations

import errno
import os

import pytest

from minivlm import io_atomic
from minivlm.io_atomic import (
    WriteError,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    recover_directory,
    replace_directory,
    write_directory,
)


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_a_file_is_replaced_and_no_temporary_is_left(tmp_path):
    target = tmp_path / "eval.json"
    atomic_write_json(target, {"accuracy": 0.5})
    atomic_write_json(target, {"accuracy": 0.9})
    assert target.read_text() == '{\n  "accuracy": 0.9\n}\n'
    assert _siblings(target) == ["eval.json"]


def test_a_full_disk_while_writing_keeps_the_previous_file(tmp_path):
    target = tmp_path / "eval.json"
    atomic_write_text(target, "previous\n")
    with pytest.raises(WriteError) as caught:
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new cont")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.errno == errno.ENOSPC
    assert f"could not write {target} (disk full" in str(caught.value)
    assert "the previous version is unchanged" in str(caught.value)
    assert target.read_text() == "previous\n" and _siblings(target) == ["eval.json"]


def test_a_safetensors_io_error_is_a_write_error_with_its_errno(tmp_path):
    class SafetensorError(Exception):  # safetensors reports its Rust I/O errors under this name
        pass

    with pytest.raises(WriteError) as caught:
        with atomic_path(tmp_path / "model.safetensors"):
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, message: \"No space left\" })")
    assert caught.value.errno == errno.ENOSPC


def test_an_error_that_is_not_io_propagates_unchanged_after_clean_up(tmp_path):
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("{}")
            raise KeyError("a bug in the writer")
    assert list(tmp_path.iterdir()) == []


def test_a_directory_is_swapped_whole(tmp_path):
    target = tmp_path / "model"

    def write(version):
        def writer(out):
            (out / "config.json").write_text(version)
            (out / "model.safetensors").write_text(version)
        return writer

    write_directory(target, write("v1"))
    write_directory(target, write("v2"))
    assert {p.name: p.read_text() for p in target.iterdir()} == {"config.json": "v2", "model.safetensors": "v2"}
    assert _siblings(target) == ["model"]


def test_a_writer_that_fails_midway_leaves_the_previous_directory(tmp_path):
    target = tmp_path / "model"
    write_directory(target, lambda out: (out / "config.json").write_text("v1"))

    def failing(out):
        (out / "config.json").write_text("v2")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match="disk full"):
        write_directory(target, failing)
    assert (target / "config.json").read_text() == "v1" and _siblings(target) == ["model"]


def test_files_the_writer_does_not_own_are_kept_and_stale_owned_ones_dropped(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "extra").mkdir()
    (target / "extra" / "a.bin").write_bytes(b"1")
    (target / "retrieval_head.json").write_text("stale")
    owned = frozenset({"config.json", "retrieval_head.json"})
    write_directory(target, lambda out: (out / "config.json").write_text("new"), owned=owned)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "extra", "notes.txt"]
    assert (target / "notes.txt").read_text() == "mine" and (target / "extra" / "a.bin").read_bytes() == b"1"


def test_without_an_atomic_exchange_a_backup_covers_the_gap_and_is_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(io_atomic, "_rename_exchange", lambda a, b: False)
    target, new = tmp_path / "model", tmp_path / "new"
    for d, v in ((target, "v1"), (new, "v2")):
        d.mkdir()
        (d / "config.json").write_text(v)
    replace_directory(new, target)
    assert (target / "config.json").read_text() == "v2" and _siblings(target) == ["model"]

    # A process killed between its two renames: the target is gone, its backup is beside it.
    backup = tmp_path / f".model{io_atomic.OLD_MARK}999999-abcdef12"
    os.rename(target, backup)
    (tmp_path / f".model{io_atomic.TMP_MARK}999999-abcdef12").mkdir()  # its half-written temporary
    recover_directory(target)
    assert (target / "config.json").read_text() == "v2" and _siblings(target) == ["model"]


def test_the_current_directory_is_written_in_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_directory(tmp_path, lambda out: (out / "config.json").write_text("here"))
    assert (tmp_path / "config.json").read_text() == "here" and os.getcwd() == str(tmp_path)
