"""Host memory while timing: glibc's malloc thresholds pinned, so that a timed call's page faults do not
depend on what ran before it (kprune_cli/runtime/allocator.py)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from kprune_cli.runtime.allocator import describe_allocator, pinned_malloc_thresholds, preloaded_allocator
from kprune_cli.runtime.timing import time_in_turns

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or preloaded_allocator() is not None,
                                reason="the thresholds are glibc's")

ACTIVATION = (8192, 1536)
"""An FFN's hidden activations at 8,192 tokens: 48 MiB in float32, above the 32 MiB where glibc's own
thresholds stop adapting (glibc alone maps such a tensor afresh, faulting in every page, each time)."""


def on_the_heap(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s memory lies in the process's ``brk`` heap (not in a mapping of its own)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith("[heap]"):
            start, end = (int(address, 16) for address in line.split()[0].split("-"))
            return start <= tensor.data_ptr() < end
    return False


@glibc_only
def test_while_pinned_a_large_activation_comes_from_the_heap():
    with pinned_malloc_thresholds():
        assert on_the_heap(torch.ones(ACTIVATION))


@glibc_only
def test_timing_in_turns_runs_with_the_thresholds_pinned():
    placed: list[bool] = []
    time_in_turns([lambda: placed.append(on_the_heap(torch.ones(ACTIVATION)))], repeats=2, warmup=1)
    assert placed == [True, True, True]


def test_the_allocator_is_named_for_the_tables_fingerprint(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert preloaded_allocator() == "libjemalloc.so.2"
    assert describe_allocator() == "LD_PRELOAD libjemalloc.so.2"
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libfoo.so")
    assert preloaded_allocator() is None
    assert describe_allocator().startswith("glibc " if platform.libc_ver()[0] == "glibc" else "the system")
