"""The command line's one error boundary: every failure is one line on stderr and an exit code.

Exit codes (also in the README, "Failure behaviour"):

* ``0``: done;
* ``1``: the run failed: training diverged (``TrainingAborted``, or most steps non-finite), the disk
  filled up or another I/O error, no intact checkpoint to resume, the run directory is being
  written by another process, out of memory, or an unexpected internal error;
* ``2``: bad input, nothing was run or changed: a wrong flag or config value (naming the field,
  what was expected and what came), a missing or unreadable file (naming it), malformed JSON,
  text that is not UTF-8, a run directory that holds another run;
* ``130`` / ``143``: interrupted by SIGINT (Ctrl-C) / SIGTERM; training saved a checkpoint first.

The message names the file, field or value and what was expected; ``minivlm --debug ...`` also
prints the traceback.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

#: OSErrors that mean "the input named does not exist or cannot be opened": bad input.
_INPUT_ERRNOS = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG)
_INPUT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def interrupted_exit_code(signum: int | None) -> int:
    """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + (signum or signal.SIGINT)


def one_line(err: BaseException) -> str:
    """The error's message on one line. A DataLoader worker's re-raised error carries the
    worker's traceback as text: only its last line (the original message) is kept."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


#: Exceptions (by class name: matching them imports nothing) that mean a failed run, not bad input.
_RUN_FAILURES = frozenset({"RunDirectoryLocked", "TrainingAborted", "CheckpointError"})


def classify(err: BaseException) -> tuple[int, str]:
    """``(exit code, message)`` for an exception that reached the command line."""
    message = one_line(err)
    name = type(err).__name__
    if _RUN_FAILURES & {cls.__name__ for cls in type(err).__mro__}:
        return EXIT_FAILED, message
    if isinstance(err, MemoryError) or name == "OutOfMemoryError":
        return EXIT_FAILED, f"out of memory: {message}"
    if isinstance(err, UnicodeError):
        return EXIT_BAD_INPUT, f"text is not valid UTF-8: {message}"
    if isinstance(err, OSError):
        if err.errno in _INPUT_ERRNOS or isinstance(err, _INPUT_ERRORS):
            return EXIT_BAD_INPUT, message
        if err.errno in (errno.ENOSPC, errno.EDQUOT) and "disk full" not in message:
            message = f"disk full: {message}"
        return EXIT_FAILED, message
    if name == "SafetensorError":  # safetensors' own error type: a weights file could not be written
        return EXIT_FAILED, f"could not write a weights file: {message}"
    if isinstance(err, ValueError):  # ConfigError, DataError, ChatFormatError, RunDirectoryError, JSON, ...
        return EXIT_BAD_INPUT, message
    return EXIT_FAILED, f"internal error ({name}: {message}); run with --debug for the traceback"


def run_guarded(command: str, func: Callable[[Any], int], args: Any, debug: bool = False) -> int:
    """``func(args)``, with every exception turned into one line on stderr and its exit code."""
    try:
        return func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"minivlm {command}: interrupted", file=sys.stderr)
        return interrupted_exit_code(signal.SIGINT)
    except BrokenPipeError:
        # The reader went away (`minivlm chat ... | head -1`): nothing more to say to it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as err:  # the boundary: nothing below it may end in a traceback
        code, message = classify(err)
        if debug:
            traceback.print_exc()
        print(f"minivlm {command}: error: {message}", file=sys.stderr)
        return code
