"""A job's output directory: claimed before any work, complete or marked failed after.

Rules (what sweeps and scripts may rely on):
- a non-empty directory is refused unless ``overwrite=true`` (or ``resume=true``, on the leftovers
  of an interrupted run); a directory another job is writing (its lock is live) is always refused;
- ``report.json`` is written last, atomically: its presence means the run succeeded;
- a failed or interrupted run (exception, Ctrl-C, SIGTERM) removes what it had written and
  leaves ``FAILED.json`` (error and config); a run stopped by a user mistake
  (:class:`UserError`) leaves nothing at all; either keeps its step checkpoints
  (``.kprune-steps/``, kprune_cli/runtime/steps.py), which ``resume=true`` continues from;
- a run killed outright (SIGKILL, power loss) cannot clean up: it leaves its lock file and no
  ``report.json`` (their presence and absence are the signal), perhaps a hidden staging
  directory; a ``pruned/`` is never half-written (it appears by renaming a complete staging
  directory). The lock names its holder and is kept fresh by a heartbeat; once the holder is
  gone (kprune_cli/runtime/locks.py: ended on this host, requeued by the scheduler, or silent for
  ``STALE_AFTER_S``), ``overwrite=true`` reuses the directory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import traceback
import uuid
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Iterator

from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.locks import STALE_AFTER_S, DirectoryLock, read_holder

LOCK_NAME = ".kprune.lock"
FAILED_NAME = "FAILED.json"
# The success marker first: a clean-up cut short never leaves report.json beside partial results.
RESULT_NAMES = ("report.json", "pruned", "report.md", FAILED_NAME)
STEPS_NAME = ".kprune-steps"
# Staging files and directories that an interrupted write leaves (write_json_atomic, save_pruned, StepCheckpoints).
STAGING_PATTERNS = (".report.json.tmp", f".{FAILED_NAME}.tmp", ".pruned.*", f"{STEPS_NAME}.*")
# Everything a run may leave in its directory: what resume=true accepts there.
RUN_PATTERNS = (*RESULT_NAMES, STEPS_NAME, LOCK_NAME, f"{LOCK_NAME}.*", *STAGING_PATTERNS)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
"""``OSError.errno`` values of a full disk or an exceeded quota."""
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
"""``OSError.errno`` values of a place that may not be written."""


@contextmanager
def write_errors(what: str, remedy: str) -> Iterator[None]:
    """Turn a full disk or a missing permission while writing ``what`` into a one-line
    :class:`UserError` that says ``remedy``; other errors stand."""
    try:
        yield
    except OSError as error:
        if error.errno not in (*NO_SPACE, *UNWRITABLE):
            raise
        where = f" ({error.filename})" if error.filename else ""
        raise UserError(f"cannot write {what}: {error.strerror}{where}; {remedy}") from None


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
        self._lock = DirectoryLock(path / LOCK_NAME)
        self._claimed = False

    def claim(self, resume: bool = False) -> None:
        """Create (or, with overwrite, clear) the directory and take its lock (kprune_cli/runtime/locks.py:
        a lock whose holder is gone is taken over). With ``resume``, the leftovers of an interrupted
        run are accepted and its step checkpoints kept."""
        holder = read_holder(self._lock.path)
        if holder is not None and not holder.is_gone():
            raise UserError(f"output_dir={self.path} is in use by another kprune job ({holder.describe()}; "
                            f"a lock counts as stale {STALE_AFTER_S:.0f} s after its last heartbeat): "
                            f"choose another output_dir")
        leftovers = sorted(path.name for path in self.path.iterdir()) if self.path.is_dir() else []
        run_leftovers = all(any(fnmatch(name, pattern) for pattern in RUN_PATTERNS) for name in leftovers)
        if leftovers and not self.overwrite and not (resume and run_leftovers):
            killed = f" (it holds the lock of a killed kprune job, {holder.describe()})" if holder else ""
            steps = " or resume=true to continue its interrupted run" if STEPS_NAME in leftovers and not resume else ""
            raise UserError(f"output_dir={self.path} exists and is not empty{killed}: choose another output_dir "
                            f"or pass overwrite=true{steps}")
        self.path.mkdir(parents=True, exist_ok=True)
        self._claimed = True  # before: an interrupt right after the lock appears still releases it
        try:
            self._lock.acquire(take_over=holder)
        except Exception:  # not taken (another job's, or not writable): nothing here is ours
            self._claimed = False
            raise
        self._remove_results(keep_steps=resume)

    def finished_report(self) -> dict[str, Any] | None:
        """The report of a run that completed in this directory, else None."""
        try:
            return json.loads((self.path / RESULT_NAMES[0]).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None

    def release(self) -> None:
        """Drop the lock (the results stay)."""
        if self._claimed:
            self._lock.release()
            self._claimed = False

    def fail(self, error: BaseException, config: Any) -> None:
        """Remove partial results and leave ``FAILED.json`` saying why (nothing for a user
        mistake); then release."""
        if not self._claimed:
            self.discard_if_empty()
            return
        self._remove_results(keep_steps=True)
        if not isinstance(error, UserError):
            try:
                write_failure(self.path, error, config)
            except OSError:
                pass  # e.g. the disk is full: the error is reported on the console all the same
        self.release()
        self.discard_if_empty()

    def discard_if_empty(self) -> None:
        """Remove the directory if nothing is in it (e.g. created by Hydra before a bad-input error)."""
        if self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def _remove_results(self, keep_steps: bool) -> None:
        """Remove staging left by an interrupted write, then the results (and the step checkpoints
        unless ``keep_steps``); directories are renamed out of sight before they are deleted, so they
        never linger half-removed."""
        for pattern in STAGING_PATTERNS:
            for leftover in self.path.glob(pattern):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
        for name in RESULT_NAMES if keep_steps else (*RESULT_NAMES, STEPS_NAME):
            target = self.path / name
            if target.is_dir():
                remove_tree(target)
            else:
                target.unlink(missing_ok=True)


def remove_tree(directory: Path) -> None:
    """Delete ``directory``, first renamed out of sight (``.NAME.removing.tmp``, a staging name) so
    that it never lingers half-removed under its own name."""
    retired = directory.with_name(f".{directory.name.lstrip('.')}.removing.tmp")
    shutil.rmtree(retired, ignore_errors=True)
    os.replace(directory, retired)
    shutil.rmtree(retired)


def check_output_dir(path: Path, overwrite: bool) -> None:
    """A :class:`UserError` if ``path`` exists and is not an empty directory, unless ``overwrite``."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise UserError(f"output_dir={str(path)!r} exists and is not empty: choose another output_dir "
                        f"or pass overwrite=true")


def new_file_mode() -> int:
    """The permissions a new file gets under this process's umask (``0o644`` under the usual ``022``)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    umask = next((int(line.split()[1], 8) for line in status.splitlines() if line.startswith("Umask:")), None)
    if umask is None:  # no /proc (macOS): read it by setting it, then put it back at once
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def follow_umask(directory: Path) -> None:
    """Give every file under ``directory`` the permissions of a new file (:func:`new_file_mode`):
    libraries that write through private temporary files (safetensors) leave them ``0600``."""
    mode = new_file_mode()
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success it becomes ``target``, its
    files readable as the umask allows (:func:`follow_umask`).

    On failure the temporary directory is removed and ``target`` is untouched (an ``OSError`` if
    another process made ``target`` meanwhile). An existing empty ``target`` is replaced; a
    non-empty one only when ``overwrite`` (else :class:`UserError`).
    """
    target = Path(target)
    check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    staging.mkdir()  # not tempfile.mkdtemp: that makes it private (0700) instead of following the umask
    try:
        yield staging
        follow_umask(staging)
        if target.exists() and overwrite:
            old = target.with_name(f"{staging.name}.old")
            os.replace(target, old)
            os.replace(staging, target)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(staging, target)  # onto a missing or empty directory: atomic on POSIX
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # still there only if something failed
