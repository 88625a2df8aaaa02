"""Wall-clock seconds per stage, for the report's ``timing``; milliseconds of calls timed in turns."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from kprune_cli.runtime.allocator import pinned_malloc_thresholds


@contextmanager
def timed(timing: dict[str, float], stage: str) -> Iterator[None]:
    """Add the seconds spent in the block to ``timing[stage]`` (starting from 0)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[stage] = timing.get(stage, 0.0) + time.perf_counter() - start


def time_in_turns(calls: Sequence[Callable[[], object]], repeats: int, warmup: int = 3,
                  min_seconds: float = 0.0) -> list[list[float]]:
    """Milliseconds of ``repeats`` calls of each of ``calls``, timed in turns (one call of each per
    round, so that a change in the machine's load affects them all alike), after ``warmup`` untimed
    calls of each; more rounds when ``repeats`` would take less than ``min_seconds`` (a round's time
    estimated from the last warm-up call of each). A call must return only once its work is done (e.g.
    synchronise a GPU). Host memory is allocated with glibc's thresholds pinned
    (:func:`~kprune_cli.runtime.allocator.pinned_malloc_thresholds`), so that a call's page faults do not
    depend on the calls timed before it."""
    times: list[list[float]] = [[] for _ in calls]
    with pinned_malloc_thresholds():
        round_seconds = 0.0  # of the last warm-up round
        for call in calls:
            last = 0.0
            for _ in range(warmup):
                start = time.perf_counter()
                call()
                last = time.perf_counter() - start
            round_seconds += last
        if round_seconds > 0:
            repeats = max(repeats, math.ceil(min_seconds / round_seconds))
        for _ in range(repeats):
            for call, kept in zip(calls, times):
                start = time.perf_counter()
                call()
                kept.append(1000.0 * (time.perf_counter() - start))
    return times
