"""The one rich console every command prints to (stderr, so stdout stays for data)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)

Item = TypeVar("Item")


def make_progress(transient: bool = True) -> Progress:
    """A progress display with description, bar, count and times, on :data:`console`."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def track(progress: Progress, items: Iterable[Item], task_id: TaskID) -> Iterator[Item]:
    """``items``, advancing task ``task_id`` of ``progress`` by one after each. Unlike
    :meth:`Progress.track` it counts in this thread, so the count is exact when the loop ends
    (rich's track counts in a thread that stops early when the display is not running)."""
    for item in items:
        yield item
        progress.advance(task_id)
