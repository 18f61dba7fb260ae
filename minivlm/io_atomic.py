"""Atomic writes: a file or directory the user relies on is replaced whole or not at all.

Every file minivlm writes for the user (models, processor files, checkpoints, ``eval.json``,
``train_result.json``, plots, configs) goes through this module. The recipe is the classic one
(POSIX ``rename(2)`` is atomic within a file system): write a temporary sibling, ``fsync`` it,
``rename`` it over the target, ``fsync`` the parent directory so the rename itself is durable.
A crash, ``kill -9`` or a full disk at any moment therefore leaves either the previous version
or the new one, never a mixture, and the temporary is removed when the writer fails.

Directories (a model: ``config.json`` + weights + tokenizer that must agree) are written into a
temporary sibling and swapped in. On Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` call,
so the path always names a complete directory; elsewhere the old directory is first renamed to
a backup and restored by :func:`recover_directory` if the process dies between the two renames.

A failure is raised as :class:`WriteError` (an ``OSError`` keeping the cause's ``errno``) whose
message names the target and says that the previous version is unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger(__name__)

#: Temporary siblings are named ``.<name>.tmp-<pid>-<random>``; backups ``.<name>.old-<pid>-<random>``.
TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


class WriteError(OSError):
    """Writing a file or directory failed; the previous version (if any) is unchanged."""


def _temp_sibling(path: Path, mark: str) -> Path:
    return path.with_name(f".{path.name}{mark}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _errno_of(err: BaseException) -> int:
    if isinstance(err, OSError) and err.errno:
        return err.errno
    text = str(err)
    if "No space left" in text or "os error 28" in text:  # safetensors' Rust I/O errors
        return errno.ENOSPC
    if "Disk quota" in text:
        return errno.EDQUOT
    return errno.EIO


def _io_cause(err: BaseException | None) -> BaseException | None:
    """The I/O failure (full disk, read-only file system, ...) behind ``err``, if it is one.

    ``err`` itself, or an exception in its ``__cause__`` / ``__context__`` chain: ``torch.save``
    reports a full disk as ``RuntimeError("[enforce fail at inline_container.cc] unexpected pos")``
    raised while handling the file object's ``OSError``, and safetensors as
    ``SafetensorError("Error while serializing: IoError(...)")``.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return err
        if type(err).__name__ == "SafetensorError" and ("IoError" in str(err) or "os error" in str(err)):
            return err
        err = err.__cause__ or err.__context__
    return None


def as_write_error(path: str | Path, err: BaseException) -> WriteError | None:
    """``err`` as a :class:`WriteError` naming ``path`` when it is an I/O failure; else None."""
    if isinstance(err, WriteError):
        return err
    cause = _io_cause(err)
    return _write_error(Path(path), cause) if cause is not None else None


def raise_write_failure(target: str | Path, err: BaseException) -> NoReturn:
    """Re-raise ``err`` (inside its ``except`` block) as a :class:`WriteError` naming ``target``
    when it is an I/O failure, unchanged otherwise (interrupts and bugs stay what they are)."""
    failure = as_write_error(target, err) if isinstance(err, Exception) else None
    if failure is not None and failure is not err:
        raise failure from err
    raise err


def _write_error(path: Path, err: BaseException) -> WriteError:
    code = _errno_of(err)
    reason = "disk full" if code in (errno.ENOSPC, errno.EDQUOT) else os.strerror(code).lower()
    detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return WriteError(code, f"could not write {path} ({reason}: {detail}); the previous version is unchanged")


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def fsync_tree(directory: str | Path) -> None:
    """Flush every file and directory below ``directory`` to disk, so a rename cannot outrun the data."""
    root = Path(directory)
    for path in sorted(root.rglob("*"), reverse=True):  # files before their directories
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed over ``path`` on success.

    For writers that take a file name (``torch.save``, ``safetensors.save_file``, ``savefig``)::

        with atomic_path(out / "model.safetensors") as tmp:
            save_file(state, str(tmp))

    Raises:
        WriteError: an I/O failure of the writer, the flush or the rename; ``path`` is untouched
            and the temporary is removed. Other errors of the writer propagate unchanged (after
            the same clean-up).
    """
    target = Path(path)
    tmp = _temp_sibling(target, TMP_MARK)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise_write_failure(target, err)
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` by ``data`` atomically (see the module docstring)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` by ``text`` (UTF-8) atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """Replace ``path`` by ``obj`` as indented JSON (plus a final newline) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=dumps.pop("indent", 2), **dumps) + "\n")


# ---- directories -----------------------------------------------------------------------------
def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux's ``renameat2(RENAME_EXCHANGE)``; False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # the kernel or file system cannot exchange: fall back to two renames
    raise OSError(code, os.strerror(code), str(b))


def replace_directory(new: str | Path, target: str | Path) -> None:
    """Put the complete directory ``new`` at ``target``, removing what ``target`` held before.

    ``target`` always names a complete directory: an atomic exchange where the platform has one;
    otherwise ``target`` is renamed to a backup first (:func:`recover_directory` restores it if
    the process dies before ``new`` is in place).
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
    elif _rename_exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # now holds the previous version
    else:
        backup = _temp_sibling(target, OLD_MARK)
        os.rename(target, backup)
        os.rename(new, target)
        shutil.rmtree(backup, ignore_errors=True)
    fsync_dir(target.parent)


def recover_directory(target: str | Path) -> None:
    """Undo what a process killed inside :func:`replace_directory` or :func:`atomic_directory`
    left beside ``target``: restore a backup when ``target`` is missing, drop temporaries."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    backups = sorted(parent.glob(f".{target.name}{OLD_MARK}*"), key=lambda p: p.stat().st_mtime)
    if backups and not target.exists():
        os.rename(backups.pop(), target)
        log.warning("restored %s from the backup a killed writer left", target)
    for leftover in [*backups, *parent.glob(f".{target.name}{TMP_MARK}*")]:
        if _owner_alive(leftover):
            continue
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def _owner_alive(path: Path) -> bool:
    """Whether the process that named this temporary (``...-<pid>-<random>``) still runs."""
    try:
        pid = int(path.name.rsplit("-", 2)[-2])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """A temporary directory to fill; it replaces ``target`` whole when the block succeeds.

    Raises:
        WriteError: an I/O failure (``target`` untouched, the temporary removed); other errors
            of the block propagate unchanged after the same clean-up.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    tmp = _temp_sibling(target, TMP_MARK)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        replace_directory(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_write_failure(target, err)


def write_directory(target: str | Path, writer: Callable[[Path], Any], owned: frozenset[str] | None = None) -> Path:
    """``writer(tmp_dir)`` fills a temporary directory that then replaces ``target`` (see
    :func:`atomic_directory`).

    With ``owned`` (the file names the writer is responsible for), anything else already in
    ``target`` is kept: carried into the new directory (hard-linked, or copied) before the swap.
    The current directory (or one containing it) cannot be swapped without pulling it from
    under the process, so it is written in place, file by file.
    """
    target = Path(target)
    cwd = Path.cwd().resolve()
    if target.exists() and (cwd == target.resolve() or target.resolve() in cwd.parents):
        log.warning("%s contains the current directory: written in place, not atomically", target)
        writer(target)
        return target
    with atomic_directory(target) as tmp:
        writer(tmp)
        if owned is not None and target.is_dir():
            for entry in target.iterdir():
                if entry.name not in owned and not (tmp / entry.name).exists():
                    _carry(entry, tmp / entry.name)
    return target


def _carry(source: Path, dest: Path) -> None:
    """Hard-link (or copy) ``source`` to ``dest``, recursively: the original stays intact."""
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, dest, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(source, dest)


def _link_or_copy(source: str | Path, dest: str | Path) -> None:
    try:
        os.link(source, dest, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, dest, follow_symlinks=False)
