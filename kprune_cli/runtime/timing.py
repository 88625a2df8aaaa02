"""Wall-clock seconds per stage, for the report's ``timing``; milliseconds of calls timed in turns."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence


@contextmanager
def timed(timing: dict[str, float], stage: str) -> Iterator[None]:
    """Add the seconds spent in the block to ``timing[stage]`` (starting from 0)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[stage] = timing.get(stage, 0.0) + time.perf_counter() - start


def time_in_turns(calls: Sequence[Callable[[], object]], repeats: int, warmup: int = 3) -> list[list[float]]:
    """Milliseconds of ``repeats`` calls of each of ``calls``, timed in turns (one call of each per
    round, so that a change in the machine's load affects them all alike), after ``warmup`` untimed
    calls of each. A call must return only once its work is done (e.g. synchronise a GPU)."""
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, kept in zip(calls, times):
            start = time.perf_counter()
            call()
            kept.append(1000.0 * (time.perf_counter() - start))
    return times
