"""What the hardware does fast: whether half-precision matrix products run on native units.

Autocast to bfloat16 or float16 pays only where the device multiplies in that precision
natively: CUDA GPUs (tensor cores; bfloat16 from compute capability 8.0) and CPUs with
AVX512-BF16 / AMX (bfloat16) or AMX-FP16 / AVX512-FP16 (float16). Elsewhere PyTorch emulates the
products; on an AVX2-only CPU they ran about ten times slower than float32 (README, Performance).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

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
