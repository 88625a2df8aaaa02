"""Peak memory of a job: CUDA allocations on a GPU, the process's peak resident memory on the CPU.

A sequential sweep (Hydra's basic launcher) runs every job in one process, so each job restarts
the count (:func:`reset_peak_memory`) to report its own peak rather than the sweep's so far.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch


def resident_mb() -> float:
    """This process's resident memory now (Linux ``/proc``; else its peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return peak_resident_mb()


def reset_peak_resident() -> None:
    """Restart the peak-resident-memory count where Linux allows it (``/proc/self/clear_refs``);
    elsewhere the peak stays that of the whole process."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_resident_mb() -> float:
    """This process's peak resident memory since :func:`reset_peak_resident` (Linux ``VmHWM``),
    or since it started (``ru_maxrss``: KB on Linux, bytes on macOS)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 2**10
    except (OSError, AttributeError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def reset_peak_memory(device: torch.device) -> None:
    """Start counting :func:`peak_memory_mb` of ``device`` afresh (at the start of a job)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_resident()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak_memory`: CUDA max allocated on a GPU, else the peak
    resident memory of the process (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_resident_mb()
