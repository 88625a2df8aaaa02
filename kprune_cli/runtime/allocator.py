"""Steady host memory while timing: glibc's malloc thresholds pinned for the duration.

glibc's ``malloc`` serves a large request (above its *mmap threshold*) with a fresh mapping, which the
kernel faults in page by page and zero-fills, and unmaps it on ``free``; freed heap memory above its
*trim threshold* goes back to the kernel too. Both thresholds adapt to what the process freed before.
PyTorch eager allocates every activation anew, so a forward pass on the CPU pays page faults whose
number depends on the tensors' sizes and on what ran before it in the process. Measured on MiniLM
(batch 32 × 53 tokens, one thread, 2-core AMD EPYC, glibc 2.36): the same dense model took 13,000 to
25,000 page faults per forward pass, depending on which models were timed beside it, and ran 12-14%
slower than with the thresholds pinned (then about 400 faults); a model of half the width, 5-15%
slower. A cost that depends on the neighbours a model is timed with cannot be added up from parts,
and a latency table of PyTorch eager did not pass its additivity check while it was there
(docs/latency.md).

:func:`pinned_malloc_thresholds` sets both thresholds to :data:`PINNED_BYTES` (1 GiB) while models are
timed, so that every tensor comes from the heap and goes back to it: the steady state of a serving
process started with ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824`` (see
:data:`DEPLOY_ENV`), or one running on jemalloc or tcmalloc, as PyTorch's CPU tuning guides advise.
glibc has no way back to its adaptive thresholds, so on leaving, both are set to
:data:`AFTER_BYTES`: 32 MiB and 64 MiB, where glibc's adaptation ends (its ceiling) in a process that
frees tensors of 32 MiB or more, as every K-prune run does. Where the process's ``malloc`` is not
glibc's (another C library, or an allocator preloaded with ``LD_PRELOAD``), nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import platform
from contextlib import contextmanager
from functools import cache
from typing import Iterator

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameters (``malloc.h``)."""

PINNED_BYTES = 1 << 30
"""Both thresholds while timing: above any activation of an encoder at the batches timed."""

AFTER_BYTES = (32 << 20, 64 << 20)
"""``(mmap, trim)`` thresholds after timing: the ceiling of glibc's own adaptation (64-bit)."""

DEPLOY_ENV = f"MALLOC_MMAP_THRESHOLD_={PINNED_BYTES} MALLOC_TRIM_THRESHOLD_={PINNED_BYTES}"
"""The environment that gives a serving process the allocator the timings were taken with."""


@cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, when it is the process's ``malloc`` (not another C library, nothing preloaded)."""
    if platform.libc_ver()[0] != "glibc" or preloaded_allocator() is not None:
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def preloaded_allocator() -> str | None:
    """The allocator named in ``LD_PRELOAD`` (jemalloc, tcmalloc, mimalloc), if any."""
    for library in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        name = os.path.basename(library)
        if any(allocator in name for allocator in ("jemalloc", "tcmalloc", "mimalloc")):
            return name
    return None


def describe_allocator() -> str:
    """How host memory is allocated while models are timed, e.g. ``glibc 2.36 malloc, thresholds
    pinned at 1 GiB``; part of a latency table's fingerprint."""
    if (preloaded := preloaded_allocator()) is not None:
        return f"LD_PRELOAD {preloaded}"
    if _glibc() is not None:
        return f"glibc {platform.libc_ver()[1]} malloc, thresholds pinned at {PINNED_BYTES >> 30} GiB"
    return "the system's malloc"


def serving_note() -> str | None:
    """One line for a report timed on PyTorch eager on the CPU: how to serve at the measured speed
    (``None`` where the thresholds are not pinned)."""
    if _glibc() is None:
        return None
    return (f"PyTorch eager was timed with glibc's malloc thresholds pinned at {PINNED_BYTES >> 30} GiB: "
            f"serve the model with {DEPLOY_ENV} (or jemalloc/tcmalloc) to run at these speeds (docs/latency.md)")


@contextmanager
def pinned_malloc_thresholds() -> Iterator[None]:
    """Run the block with glibc's mmap and trim thresholds at :data:`PINNED_BYTES`, then leave them
    at :data:`AFTER_BYTES` (see the module docstring); without glibc's ``malloc``, just run it."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, PINNED_BYTES)
    libc.mallopt(M_TRIM_THRESHOLD, PINNED_BYTES)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, AFTER_BYTES[0])
        libc.mallopt(M_TRIM_THRESHOLD, AFTER_BYTES[1])
        libc.malloc_trim(0)
