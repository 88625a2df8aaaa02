"""Find the runs under output and sweep directories: finished, failed, or incomplete.

A run directory is one that holds any of ``report.json`` (finished), ``FAILED.json`` (failed),
the lock file or ``pruned/`` (started, never finished); an empty job directory of a Hydra
sweep (a directory beside ``multirun.yaml``) is a run that never started. Hidden directories
(``.submitit`` logs) are skipped, and nothing is looked for inside a run directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from kprune_cli.core.report import SCHEMA_VERSION, Report
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.output_dir import FAILED_NAME, LOCK_NAME

REPORT_NAME = "report.json"
SWEEP_CONFIG_NAME = "multirun.yaml"  # Hydra writes it at the root of every sweep
RUN_MARKERS = frozenset({REPORT_NAME, FAILED_NAME, LOCK_NAME, "pruned"})


@dataclass(frozen=True)
class FinishedRun:
    path: Path
    report: Report


@dataclass(frozen=True)
class FailedRun:
    path: Path
    error: str  # one line: "<ExceptionType>: <message>"


@dataclass
class Runs:
    """The runs found under some directories, each in exactly one list."""

    finished: list[FinishedRun] = field(default_factory=list)
    failed: list[FailedRun] = field(default_factory=list)
    incomplete: list[Path] = field(default_factory=list)


def find_runs(roots: Sequence[Path]) -> Runs:
    """Every run directory under ``roots`` (each a run or a tree of runs), classified."""
    runs = Runs()
    for root in roots:
        if not root.is_dir():
            raise UserError(f"{root} is not a directory: give directories that hold kprune runs or sweeps")
        for directory in _run_dirs(root):
            _classify(directory, runs)
    return runs


def _run_dirs(root: Path) -> Iterator[Path]:
    """Run directories under ``root`` (``root`` itself included), in sorted order."""
    for current, subdirs, files in os.walk(root):
        path = Path(current)
        if RUN_MARKERS.intersection(subdirs + files):
            subdirs.clear()
            yield path
            continue
        subdirs[:] = sorted(name for name in subdirs if not name.startswith("."))
        if SWEEP_CONFIG_NAME in files:
            yield from (path / name for name in subdirs if not any((path / name).iterdir()))


def _classify(directory: Path, runs: Runs) -> None:
    if (directory / FAILED_NAME).exists():
        runs.failed.append(FailedRun(directory, _failure_message(directory / FAILED_NAME)))
    elif (directory / REPORT_NAME).exists():
        report = json.loads((directory / REPORT_NAME).read_text())
        if report.get("schema_version") != SCHEMA_VERSION:
            runs.failed.append(FailedRun(directory, f"report.json has schema_version "
                                                    f"{report.get('schema_version')!r}; this kprune reads "
                                                    f"{SCHEMA_VERSION}"))
        else:
            runs.finished.append(FinishedRun(directory, report))
    else:
        runs.incomplete.append(directory)


def _failure_message(path: Path) -> str:
    """The first line of the error recorded in a FAILED.json."""
    try:
        error = str(json.loads(path.read_text())["error"])
    except (ValueError, KeyError) as problem:
        return f"unreadable {path.name}: {problem}"
    return error.splitlines()[0] if error else "unknown error"
