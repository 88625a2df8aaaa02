"""The one rich console every command prints to (stderr, so stdout stays for data), and progress.

In a terminal, progress is rich's live display. Anywhere else (a log file, a SLURM job's output,
CI, ``nohup``) it is plain lines, with no escape codes or carriage-return redraws: one when a stage
starts and one per step (every tenth of the stage for stages of many steps), each with the time
elapsed and an estimate of the time left. Loops report through the same few calls either way:
``add_task``, ``update(description=...)``, ``advance``, or :func:`track`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape
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


# Stages of more steps than this print a line every tenth of the stage, not every step.
EVERY_STEP_UP_TO = 50


class LogProgress(Progress):
    """Progress as plain lines on :data:`console`, for a console that is not a terminal.

    A :class:`~rich.progress.Progress` (it keeps the tasks' counts and times) whose live display
    is off; it prints ``K-prune FFN 3 (8/12) 212 s elapsed, ~110 s left`` instead.
    """

    def __init__(self) -> None:
        super().__init__(console=console, disable=True)
        self._printed: dict[TaskID, float] = {}  # per task: the count of its last line

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields: Any) -> TaskID:
        task_id = super().add_task(description, start=start, total=total, completed=completed, visible=visible,
                                   **fields)
        self._printed[task_id] = completed
        self._print(f"{description} ({_count(completed)}/{_count(total)})" if total else description)
        return task_id

    def update(self, task_id: TaskID, **changes: Any) -> None:
        super().update(task_id, **changes)
        if changes.get("completed") is not None or changes.get("advance") is not None:
            self._step_line(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._step_line(task_id)

    def _step_line(self, task_id: TaskID) -> None:
        """A line for the task's new count, if it is a step to report."""
        task = self._tasks[task_id]
        total, done = task.total, task.completed
        every = 1 if not total or total <= EVERY_STEP_UP_TO else math.ceil(total / 10)
        if done <= self._printed[task_id] or (done // every == self._printed[task_id] // every and done != total):
            return
        self._printed[task_id] = done
        elapsed = task.elapsed or 0.0
        line = f"{task.description} ({_count(done)}/{_count(total)}) {elapsed:.0f} s elapsed"
        if total and done < total:
            line += f", ~{elapsed / done * (total - done):.0f} s left"
        self._print(line)

    def _print(self, line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def _count(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def warn(message: str) -> None:
    """Print ``kprune: warning: <message>`` on the console (stderr), as plain text."""
    console.print(f"[bold]kprune:[/] warning: {escape(message)}", highlight=False, soft_wrap=True)


def make_progress(transient: bool = True) -> Progress:
    """A progress display with description, bar, count and times, on :data:`console`; plain lines
    (:class:`LogProgress`) when the console is not a terminal."""
    if not console.is_terminal:
        return LogProgress()
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
