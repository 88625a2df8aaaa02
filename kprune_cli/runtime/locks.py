"""The lock of a job's output directory, safe on shared filesystems and across hosts.

The lock is a small JSON file naming its holder (pid, host, scheduler job id). It is created
atomically (a hard link of a complete temporary file, which NFS also makes atomic), so it is never
half-written, and while the job runs a daemon thread refreshes its modification time every
:data:`HEARTBEAT_S` seconds. A lock is *stale*, its holder gone, when

- its holder ran on this host and that process has ended;
- it names the scheduler job this process belongs to (``SLURM_JOB_ID``, or the array task): the
  scheduler requeued that job, so the earlier run of it is over, whichever node it ran on;
- its heartbeat stopped :data:`STALE_AFTER_S` seconds ago: a holder on another host that was killed
  (or has hung). Hosts' clocks are assumed to agree to well within that time (NTP).

A stale lock is taken over; a live one always refuses the directory.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kprune_cli.runtime.errors import UserError

HEARTBEAT_S = 30.0
"""Seconds between two refreshes of a held lock's modification time."""
STALE_AFTER_S = 300.0
"""Seconds without a heartbeat after which a lock counts as left by a job that is gone."""


def scheduler_job_id() -> str | None:
    """This process's job on the cluster scheduler (SLURM: ``JOB`` or ``ARRAYJOB_TASK``), else None.
    A requeued job keeps it."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"slurm:{array}_{task}"
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm:{job}" if job else None


@dataclass(frozen=True)
class LockHolder:
    """What a lock file says about the job holding it, and how long ago it last beat."""

    pid: int | None
    host: str | None
    job: str | None
    age_s: float

    def describe(self) -> str:
        """``"pid 12 on node-a (slurm:345), heartbeat 40 s ago"`` for messages."""
        who = f"pid {self.pid} on {self.host}" if self.pid is not None else "an unknown process"
        return who + (f" ({self.job})" if self.job else "") + f", heartbeat {self.age_s:.0f} s ago"

    def is_gone(self) -> bool:
        """Whether the holder has ended (see the module docstring); unknown counts as alive
        until the heartbeat is stale."""
        if self.age_s >= STALE_AFTER_S:
            return True
        if self.job is not None and self.job == scheduler_job_id():
            return True
        if self.host != socket.gethostname() or self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False


def read_holder(path: Path) -> LockHolder | None:
    """The holder named by the lock file ``path``; None when there is no lock. An unreadable
    lock names nobody and is judged by its heartbeat alone."""
    try:
        beat = path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None
    age = max(0.0, time.time() - beat)
    try:
        fields = json.loads(text)
        return LockHolder(int(fields["pid"]), str(fields["host"]), fields.get("job"), age)
    except (ValueError, KeyError, TypeError):
        pass
    try:  # written by kprune before the heartbeat: "PID HOST"
        pid, host = text.split()
        return LockHolder(int(pid), host, None, age)
    except ValueError:
        return LockHolder(None, None, None, age)


class DirectoryLock:
    """The lock file ``path``, taken with :meth:`acquire` and kept alive by a heartbeat until :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._token = uuid.uuid4().hex  # tells this lock from any other job's, for release()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self, take_over: LockHolder | None = None) -> None:
        """Create the lock; ``take_over``: the stale holder read before, whose lock is replaced.
        A :class:`UserError` if another job holds it (or took it over first)."""
        if take_over is not None:
            self._break(take_over)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "job": scheduler_job_id(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": self._token}
        staging = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        staging.write_text(json.dumps(record) + "\n")
        try:
            os.link(staging, self.path)
        except FileExistsError:
            holder = read_holder(self.path)
            raise UserError(f"output_dir={self.path.parent} is in use by another kprune job"
                            f"{f' ({holder.describe()})' if holder else ''}; choose another output_dir") from None
        finally:
            staging.unlink(missing_ok=True)
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="kprune-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _break(self, stale: LockHolder) -> None:
        """Remove the stale lock, unless another job replaced it since it was read (then that job's
        lock is put back)."""
        retired = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.stale")
        try:
            os.replace(self.path, retired)
        except FileNotFoundError:
            return
        now = read_holder(retired)
        if now is not None and (now.pid, now.host, now.job) != (stale.pid, stale.host, stale.job):
            os.replace(retired, self.path)
            raise UserError(f"output_dir={self.path.parent} is in use by another kprune job ({now.describe()}); "
                            f"choose another output_dir")
        retired.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return  # removed (released) or the filesystem is gone: nothing to keep alive

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is this one (safe to call after an
        :meth:`acquire` that an interrupt cut short, at any point)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        try:
            owned = json.loads(self.path.read_text()).get("token") == self._token
        except (OSError, ValueError, AttributeError):
            owned = False
        if owned:
            self.path.unlink(missing_ok=True)
