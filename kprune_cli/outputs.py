"""A job's output directory: claimed before any work, complete or marked failed after.

Rules (what sweeps and scripts may rely on):
- a non-empty directory is refused unless ``overwrite=true``; a directory another job is
  writing (its lock file exists) is always refused;
- ``report.json`` is written last, atomically: its presence means the run succeeded;
- a failed run removes what it had written and leaves ``FAILED.json`` (error and config);
  a run stopped by a user mistake (:class:`UserError`) leaves nothing at all.
"""

from __future__ import annotations

import json
import os
import shutil
import traceback
from pathlib import Path
from typing import Any

from kprune_cli.errors import UserError

LOCK_NAME = ".kprune.lock"
FAILED_NAME = "FAILED.json"
RESULT_NAMES = ("pruned", "report.json", "report.md", FAILED_NAME)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON to a temporary sibling, then rename it onto ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_failure(directory: Path, error: BaseException, config: Any) -> None:
    """Write ``directory/FAILED.json``: the error, its traceback and the job's config."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / FAILED_NAME, {
        "error": f"{type(error).__name__}: {error}",
        "traceback": "".join(traceback.format_exception(error)),
        "config": config,
    })


class OutputDir:
    """The directory one job writes into."""

    def __init__(self, path: Path, overwrite: bool) -> None:
        self.path = path
        self.overwrite = overwrite
        self._lock = path / LOCK_NAME
        self._claimed = False

    def claim(self) -> None:
        """Create (or, with overwrite, clear) the directory and take its lock."""
        if self._lock.exists():
            raise UserError(f"output_dir={self.path} is in use by another kprune job (lock file {self._lock}); "
                            f"choose another output_dir")
        if self.path.is_dir() and any(self.path.iterdir()) and not self.overwrite:
            raise UserError(f"output_dir={self.path} exists and is not empty: choose another output_dir "
                            f"or pass overwrite=true")
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self._lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise UserError(f"output_dir={self.path} is in use by another kprune job; choose another output_dir") from None
        with os.fdopen(fd, "w") as lock:
            lock.write(f"{os.getpid()}\n")
        self._claimed = True
        self._remove_results()

    def release(self) -> None:
        """Drop the lock (the results stay)."""
        if self._claimed:
            self._lock.unlink(missing_ok=True)
            self._claimed = False

    def fail(self, error: BaseException, config: Any) -> None:
        """Remove partial results and leave ``FAILED.json`` saying why (nothing for a user
        mistake); then release."""
        if not self._claimed:
            self.discard_if_empty()
            return
        self._remove_results()
        if isinstance(error, UserError):
            self.release()
            self.discard_if_empty()
            return
        write_failure(self.path, error, config)
        self.release()

    def discard_if_empty(self) -> None:
        """Remove the directory if nothing is in it (e.g. created by Hydra before a bad-input error)."""
        if self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def _remove_results(self) -> None:
        for name in RESULT_NAMES:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
