"""Per-job peak memory (runtime/memory.py): a sequential sweep's jobs report their own peaks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import kprune
from test_cli import run_args

from kprune_cli.runtime.memory import peak_memory_mb, reset_peak_memory

CPU = torch.device("cpu")
BALLOON_MB = 600


def balloon() -> None:
    """Touch and free ``BALLOON_MB`` of memory (returned to the system: one large allocation)."""
    block = torch.ones(BALLOON_MB * 2**20 // 4)
    del block


@pytest.fixture
def clear_refs():
    """Skip where the peak cannot be reset (not Linux, or /proc/self/clear_refs not writable)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("needs a writable /proc/self/clear_refs (Linux)")


def test_reset_restarts_the_cpu_peak(clear_refs):
    reset_peak_memory(CPU)
    balloon()
    inflated = peak_memory_mb(CPU)
    reset_peak_memory(CPU)
    assert peak_memory_mb(CPU) < inflated - BALLOON_MB / 2


def test_sequential_runs_report_their_own_peaks(clear_refs, tiny_checkpoint, mrpc_dir, tmp_path):
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, tmp_path / "a")) == 0
    balloon()  # a big job between the two, as in a sweep
    inflated = peak_memory_mb(CPU)
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, tmp_path / "b")) == 0
    peaks = [json.loads((tmp_path / name / "report.json").read_text())["peak_memory_mb"] for name in "ab"]
    assert peaks[1] < inflated - BALLOON_MB / 2
    assert abs(peaks[1] - peaks[0]) < BALLOON_MB / 2
