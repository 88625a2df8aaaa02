"""What the hardware does fast: whether half-precision matrix products run on native units.

Autocast to bfloat16 or float16 pays only where the device multiplies in that precision
natively: CUDA GPUs (tensor cores; bfloat16 from compute capability 8.0) and CPUs with
AVX512-BF16 / AMX (bfloat16) or AMX-FP16 / AVX512-FP16 (float16). Elsewhere PyTorch emulates the
products; on an AVX2-only CPU they ran about ten times slower than float32 (README, Performance).
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

import torch

from kprune_cli.runtime.console import console

CPU_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
"""Linux ``/proc/cpuinfo`` flags of the native units for each half precision."""


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where that file is absent."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` multiplies ``dtype`` (bfloat16 or float16) matrices on native units."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 8 if dtype == torch.bfloat16 else major >= 7
    if device.type != "cpu":
        return False
    flags = cpu_flags()
    if flags:
        return any(flag in flags for flag in CPU_FLAGS[dtype])
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def describe_cpu() -> str:
    """The CPU's vector extension as PyTorch uses it, e.g. ``"AVX2"`` or ``"AVX512"``."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_device(device: torch.device) -> str:
    """One line naming the device a command runs on, e.g. ``cuda:0 (NVIDIA H100 80GB HBM3, bf16
    native)`` or ``cpu (AMD EPYC 7B13, 2 threads, bf16 emulated)``."""
    bf16 = "bf16 native" if native_matmul(device, torch.bfloat16) else "bf16 emulated"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)}, {bf16})"
    return f"{device} ({cpu_model()}, {torch.get_num_threads()} threads, {bf16})"


def emulated_note(setting: str, dtype: torch.dtype | None, device: torch.device, work: str,
                  instead: str) -> list[str]:
    """One line when ``setting`` (e.g. ``"eval_dtype=bf16"``) asks ``device`` for half-precision products
    in ``dtype`` that it only emulates: ``work`` (e.g. ``"the evaluation's passes"``) then runs far slower
    than in float32 (50x for bf16 on an AVX2 CPU), and ``instead`` (e.g. ``"eval_dtype=fp32"``) is
    faster; no line for float32 (``None``) or native units."""
    if dtype is None or native_matmul(device, dtype):
        return []
    where = f"this CPU ({describe_cpu()})" if device.type == "cpu" else str(device)
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    return [f"{setting}: {where} has no native {name} matrix units, so {work} run emulated, far slower than in "
            f"float32; {instead} is faster here"]


def announce_device(device: torch.device) -> None:
    """Print the start line ``device: ...`` (:func:`describe_device`), so that a job that silently
    fell back to the CPU (``device=auto`` with a CPU build of torch) shows it at once."""
    console.print(f"[bold]device:[/] {describe_device(device)}", highlight=False, soft_wrap=True)


FULL_RATE_FLOAT64 = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}
"""CUDA compute capabilities with float64 at 1/2 the float32 rate or better (P100, V100, A100,
H100/H200, B200); other GPUs (T4, A10, L4, RTX) run float64 at 1/32 to 1/64 of it."""


def fast_float64(device: torch.device) -> bool:
    """Whether ``device`` multiplies float64 matrices at a useful rate: CPUs and datacenter GPUs."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) in FULL_RATE_FLOAT64
