"""What every benchmark shares: timing, peak memory, the run's environment, tables and JSON.

Conventions (README.md beside this file):

* every benchmark is a module run as ``python -m benchmarks.<name> [--small] [--out DIR]`` from the
  repository root, prints its table last, and writes ``DIR/<name>.json`` holding the
  environment (card, torch version, date) and one record per row;
* ``--small`` selects tiny shapes that run in seconds; it is the default on a machine without
  CUDA (``--full`` forces the real shapes anywhere);
* rows are written to the JSON file as soon as they are measured, so a run stopped by a time
  limit still leaves what it measured.

Timing: CUDA work is timed with CUDA events around each repetition after warm-up (the median is
reported); CPU work with ``time.perf_counter``.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the
measured call. On CPU, where PyTorch keeps no allocator statistics (``tracemalloc`` does not see
its allocations), :class:`LiveTensorMemory` counts the bytes of tensor storages created inside the
call that are still alive, op by op, through a ``TorchDispatchMode``. That count is deterministic
(no allocator caching, no other process), works on the meta device (shapes only, no compute),
and sees exactly what the code keeps alive, including tensors autograd saves for backward.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from minivlm.provenance import source_commit


REPO_ROOT = Path(__file__).resolve().parent.parent

#: Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by card name fragment, for MFU. The first
#: fragment found in ``torch.cuda.get_device_name()`` wins. Source: NVIDIA's H100/H200 datasheets.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
)


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    """Flags every benchmark accepts."""
    parser = argparse.ArgumentParser(description=description)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="tiny shapes (seconds); the default without CUDA")
    size.add_argument("--full", action="store_true", help="the real shapes, even on CPU")
    parser.add_argument("--out", type=Path, default=None, help="directory for <benchmark>.json")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions before timing")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (the median is reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: unchanged); 1 is steadier on a shared machine")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new rows after this many seconds (rows left are recorded as skipped)")
    return parser


@dataclass(frozen=True)
class RunSettings:
    """Resolved common flags."""

    device: torch.device
    small: bool
    warmup: int
    reps: int
    out: Path | None
    budget_s: float | None


def resolve_settings(args: argparse.Namespace, warmup: tuple[int, int] = (1, 3),
                     reps: tuple[int, int] = (3, 10)) -> RunSettings:
    """Device, size and repetition counts; ``warmup``/``reps`` give the (small, full) defaults."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    for flag, value, least in (("--threads", args.threads, 1), ("--warmup", args.warmup, 0), ("--reps", args.reps, 1)):
        if value is not None and value < least:
            raise SystemExit(f"{flag} must be >= {least}; got {value}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    small = args.small or (not args.full and device.type != "cuda")
    pick = 0 if small else 1
    return RunSettings(
        device=device,
        small=small,
        warmup=args.warmup if args.warmup is not None else warmup[pick],
        reps=args.reps if args.reps is not None else reps[pick],
        out=args.out,
        budget_s=args.budget_s,
    )


class Budget:
    """Wall-clock allowance for a benchmark: rows started after it runs out are skipped."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.perf_counter()

    @property
    def spent(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.start > self.seconds


# ------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------
def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    """The card name on CUDA; on CPU the processor and how many cores this process may use."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {platform.processor() or platform.machine()} ({cores} cores, {torch.get_num_threads()} threads)"


def peak_bf16_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of the card, or None when unknown (CPUs: no MFU is reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in PEAK_BF16_TFLOPS if fragment in name), None)


def environment(device: torch.device) -> dict[str, Any]:
    """What a figure needs to be quoted: card, library versions, date, commit."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _package_version("triton"),
        "transformers": _package_version("transformers"),
        "python": platform.python_version(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": source_commit(),
        "argv": sys.argv[1:],
    }


# ------------------------------------------------------------------------------------------
# Timing and memory
# ------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``reps`` runs after ``warmup`` runs."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1; got {reps}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class LiveTensorMemory(TorchDispatchMode):
    """Counts the bytes of tensor storages created under this mode that are still alive.

    Every op's outputs are inspected: a storage that none of the op's inputs shares is new (views
    and in-place results alias an input and are not counted twice); its bytes are added, and a
    finaliser on the storage object (PyTorch keeps one Python object per live storage) subtracts
    them when the storage is freed. ``peak_bytes`` is the maximum of the running total.

    Tensors that existed before the mode was entered are not counted: the measure is the extra
    memory a computation needs. Storages grown by ``resize_`` keep their first size.
    Example::

        with LiveTensorMemory() as memory:
            loss = fn(hidden, weight, targets)
            loss.backward()
        memory.peak_bytes
    """

    def __init__(self) -> None:
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._tracked: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.current_bytes -= self._tracked.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        input_storages = {id(t.untyped_storage()) for t in inputs if _has_storage(t)}
        result = func(*args, **kwargs)
        for tensor in tree_flatten(result)[0]:
            if not isinstance(tensor, torch.Tensor) or not _has_storage(tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in input_storages or key in self._tracked:
                continue
            self._tracked[key] = storage.nbytes()
            self.current_bytes += storage.nbytes()
            weakref.finalize(storage, self._release, key)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return result


def _has_storage(tensor: torch.Tensor) -> bool:
    try:
        tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse/nested/functional wrappers
        return False
    return True


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory ``fn()`` adds above what was allocated before it (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveTensorMemory() as memory:
        fn()
    return memory.peak_bytes


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------
class Report:
    """One benchmark's results: rows, notes, the environment; saved as JSON after every row."""

    def __init__(self, name: str, settings: RunSettings, config: dict[str, Any] | None = None):
        self.name = name
        self.settings = settings
        self.payload: dict[str, Any] = {
            "benchmark": name,
            "environment": environment(settings.device),
            "small": settings.small,
            "config": config or {},
            "rows": [],
            "notes": [],
        }

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.payload["rows"]

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.rows.append(row)
        self.save()
        return row

    def note(self, text: str) -> None:
        self.payload["notes"].append(text)
        self.save()

    def save(self) -> Path | None:
        if self.settings.out is None:
            return None
        self.settings.out.mkdir(parents=True, exist_ok=True)
        path = self.settings.out / f"{self.name}.json"
        path.write_text(json.dumps(self.payload, indent=2, default=str) + "\n")
        return path

    def header(self) -> str:
        env = self.payload["environment"]
        size = "small shapes" if self.settings.small else "full shapes"
        return f"== {self.name} ({size}) on {env['device']}, torch {env['torch']}, {env['date_utc']} UTC =="


class RowSkipped(RuntimeError):
    """A row that cannot run here (e.g. the peer library is missing): noted as ``skipped: ...``."""


#: What one row may fail with while the run goes on (OOM, an unsupported shape, a compile error).
ROW_ERRORS = (RuntimeError, ValueError, NotImplementedError)


@contextmanager
def measured_row(report: "Report", row: dict[str, Any], device: torch.device) -> Iterator[dict[str, Any]]:
    """Measure ``row`` inside the block, then free memory and add the row to ``report``.

    A :data:`ROW_ERRORS` failure is recorded in the row's note instead of raised: one failing
    configuration must not cost the rest of a scarce GPU run. Memory is released afterwards
    because a traceback holds the failed row's tensors.
    """
    try:
        yield row
    except RowSkipped as error:
        row["note"] = f"skipped: {error}"
    except ROW_ERRORS as error:
        row["note"] = error_note(error)
    release_memory(device)
    report.add(row)


def error_note(error: BaseException) -> str:
    """A row's note for a configuration that failed: the exception's type and first line."""
    first_line = str(error).splitlines()[0][:160] if str(error) else ""
    return f"error: {type(error).__name__}: {first_line}"


def mib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**20


def release_memory(device: torch.device) -> None:
    """On CUDA, free the previous row's tensors and cached blocks so that one row's peak does not
    depend on the rows before it. (On CPU there is no cache to empty, and a full garbage
    collection after torch.compile has run costs a third of a second.)"""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
