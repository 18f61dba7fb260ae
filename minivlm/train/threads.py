"""Choose the CPU's intra-op thread count from measured step times, not from the core count.

On a small shared CPU the fastest thread count depends on what else runs: on this project's
2-core machine, ``tiny`` steps take ~400 ms with two threads and ~640 ms with one when the
machine is idle, but with one other busy process two threads collapse to ~2,800 ms (OpenMP's
threads wait for each other at every parallel region, and one of them keeps losing its core)
while one thread stays near 700 ms. So the trainer times real training steps under each
candidate, interleaved (A B A B ...) so that a change of load hits both alike, keeps the fastest,
and measures again every ``reprobe_every`` steps in case the load changed.

Only speed depends on the choice: every step is computed either way, so the schedule, the data
and the results stay those of the seed (up to float rounding in parallel reductions).
"""

from __future__ import annotations

import logging
import os
import statistics
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_candidates(cores: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``cores``, and ``cores`` itself: a handful of settings worth timing."""
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    candidates, n = [], 1
    while n < cores:
        candidates.append(n)
        n *= 2
    candidates.append(cores)
    return tuple(candidates)


class ThreadTuner:
    """Picks, by measurement, the intra-op thread count under which training steps run fastest.

    The trainer calls :meth:`threads_for_next_step` before a step (which sets that many threads)
    and :meth:`record` with the step's duration after it. A *probe* of ``rounds`` rounds runs each
    candidate for one step per round, candidates interleaved; the candidate with the lowest
    median step time wins. The first probe starts after ``warmup`` steps (the first steps
    allocate and are slow under any setting); later probes every ``reprobe_every`` steps.
    A challenger replaces the current choice only when faster by more than ``tolerance``
    (relative), so noise does not flip the setting back and forth.

    Args:
        candidates: thread counts to try (e.g. :func:`thread_candidates`); one candidate means
            a fixed setting and no probing.
        set_threads: applies a thread count (``torch.set_num_threads``; replaceable for tests).
    """

    def __init__(self, candidates: Sequence[int], *, warmup: int = 2, rounds: int = 3, reprobe_every: int = 200,
                 tolerance: float = 0.05, set_threads: Callable[[int], None] = torch.set_num_threads):
        if not candidates or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in candidates):
            raise ValueError(f"thread candidates must be integers >= 1, got {list(candidates)!r}")
        if warmup < 0 or rounds < 1 or reprobe_every < 1 or tolerance < 0:
            raise ValueError(f"ThreadTuner needs warmup >= 0, rounds >= 1, reprobe_every >= 1, tolerance >= 0; got "
                             f"{warmup}, {rounds}, {reprobe_every}, {tolerance}")
        self.candidates = tuple(dict.fromkeys(candidates))
        self.warmup, self.rounds, self.reprobe_every, self.tolerance = warmup, rounds, reprobe_every, tolerance
        self.set_threads = set_threads
        self.choice = max(self.candidates)  # torch's own default: as many threads as cores
        self.history: list[dict[int, float]] = []  # median step seconds per candidate, one dict per probe
        self._steps = 0  # steps seen by this tuner
        self._probe_start: int | None = warmup if len(self.candidates) > 1 else None
        self._timings: dict[int, list[float]] = {}
        self._current: int | None = None

    @property
    def probing(self) -> bool:
        return self._probe_start is not None and self._steps >= self._probe_start

    def threads_for_next_step(self) -> int:
        """The thread count for the next step (applied through ``set_threads`` when it changes)."""
        if self.probing:
            position = self._steps - self._probe_start
            threads = self.candidates[position % len(self.candidates)]
        else:
            threads = self.choice
        if threads != self._current:
            self.set_threads(threads)
            self._current = threads
        return threads

    def record(self, seconds: float) -> None:
        """The duration of the step just run under :meth:`threads_for_next_step`'s count."""
        if self.probing:
            self._timings.setdefault(self._current, []).append(seconds)
            if self._steps - self._probe_start + 1 == self.rounds * len(self.candidates):
                self._decide()
        self._steps += 1

    def _decide(self) -> None:
        medians = {c: statistics.median(times) for c, times in self._timings.items()}
        self.history.append(medians)
        best = min(medians, key=medians.get)
        if best != self.choice and medians[best] < medians[self.choice] * (1 - self.tolerance):
            log.info("CPU threads: %d -> %d (median step %s)", self.choice, best,
                     ", ".join(f"{c} threads {1000 * t:.0f} ms" for c, t in sorted(medians.items())))
            self.choice = best
        else:
            log.debug("CPU threads stay %d (median step %s)", self.choice,
                      ", ".join(f"{c} threads {1000 * t:.0f} ms" for c, t in sorted(medians.items())))
        self._timings = {}
        self._probe_start = self._steps + 1 + self.reprobe_every
