"""Wall-clock seconds per stage, for the report's ``timing``."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def timed(timing: dict[str, float], stage: str) -> Iterator[None]:
    """Add the seconds spent in the block to ``timing[stage]`` (starting from 0)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[stage] = timing.get(stage, 0.0) + time.perf_counter() - start
