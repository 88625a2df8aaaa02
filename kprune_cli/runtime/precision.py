"""Numerics switches of a job: deterministic algorithms, float32 matrix products in full precision, and
the names of the precisions a forward pass may run in (``fp32``, ``bf16``, ``fp16``).

On the CPU both change nothing by default (PyTorch's CPU kernels are deterministic, and float32
products are exact IEEE float32 unless someone lowers ``torch.set_float32_matmul_precision``). On
CUDA, cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` for reproducible products, some backward kernels
(attention, index_add) are non-deterministic unless asked, and TF32 (a 10-bit mantissa) may be
switched on by the environment or another library.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The autocast dtype of each precision name a setting takes (``eval_dtype``, ``kprune bench dtype``;
checked by :func:`kprune_cli.config.values.check_precision`); None: float32."""

CUBLAS_WORKSPACE = ":4096:8"
"""``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS (PyTorch's reproducibility notes)."""


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """With ``enabled``: deterministic kernels where PyTorch has them (``warn_only``: an operation
    without one warns instead of raising) and deterministic cuBLAS workspaces; the previous mode
    is restored on exit. ``CUBLAS_WORKSPACE_CONFIG`` is read when cuBLAS starts, so it is set
    (if unset) before the first CUDA product of the process: a job's first use of CUDA should come
    inside this block. Without ``enabled``: nothing changes."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@contextmanager
def tolerant_determinism() -> Iterator[None]:
    """Where deterministic algorithms are enforced (raising; set by a user, a site or a library),
    let an operation without a deterministic kernel warn instead inside this block (e.g. the CUDA
    backward of the negative log-likelihood loss in Kwon et al.'s Fisher)."""
    if not torch.are_deterministic_algorithms_enabled() or torch.is_deterministic_algorithms_warn_only_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True)


@contextmanager
def full_float32() -> Iterator[None]:
    """float32 matrix products in full IEEE float32 inside this block (no TF32 or bfloat16 passes,
    whatever ``torch.set_float32_matmul_precision`` was set to); restored on exit. Autocast regions
    are unaffected. ``NVIDIA_TF32_OVERRIDE=1`` forces TF32 in the driver and cannot be undone here:
    :func:`matmul_precision` reports it."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def matmul_precision() -> str:
    """The float32 matrix-product precision of this process outside :func:`full_float32`, for the
    report: ``"highest"`` (IEEE float32), ``"high"`` / ``"medium"`` (TF32 / bfloat16 allowed), and
    ``"tf32 forced by NVIDIA_TF32_OVERRIDE=1"`` where the driver overrides it."""
    if os.environ.get("NVIDIA_TF32_OVERRIDE") == "1":
        return "tf32 forced by NVIDIA_TF32_OVERRIDE=1"
    return torch.get_float32_matmul_precision()
