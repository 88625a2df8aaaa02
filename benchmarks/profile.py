"""Where a K-prune pruning spends its time: operator groups from ``torch.profiler``.

:func:`profile_pruning` prunes a case with the fast schedule under the profiler and sums the
operators' self time (CPU, or CUDA kernels on a GPU) into :data:`OP_GROUPS`; it also reports the
matmul throughput the passes reach (the profiler counts matmul FLOPs) beside that of plain
matmuls of the passes' shape (:func:`matmul_throughput`), which tells whether the passes are
bound by their matmuls or by the work around them.
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.cases import BenchCase
from kprune_cli.pruners.kprune.pruner import KPrunePruner

OP_GROUPS: dict[str, tuple[str, ...]] = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::addmv", "aten::dot"),
    "attention": ("scaled_dot_product", "flash_attention", "efficient_attention", "aten::_softmax",
                  "aten::_softmax_backward_data"),
    "activation": ("aten::gelu", "aten::gelu_backward", "aten::tanh", "aten::relu"),
    "layer norm": ("layer_norm",),
    "copies and casts": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::stack",
                         "aten::index", "aten::contiguous"),
}
"""Operator groups by name fragment (an operator joins the first group one of whose fragments it
contains); the rest (elementwise arithmetic, reductions, allocation) is ``"other"``."""


def op_group(name: str) -> str:
    """The :data:`OP_GROUPS` group of the operator ``name``, or ``"other"``."""
    return next((group for group, fragments in OP_GROUPS.items() if any(f in name for f in fragments)), "other")


def self_times(events: Iterable, cuda: bool) -> tuple[dict[str, float], int]:
    """Self time in µs by operator name, and the matmul FLOPs, of the profiler's ``events``
    (``key_averages()``): CPU self time, or with ``cuda`` the device time of the operators. On a GPU
    the rows include the kernels themselves (``void cutlass...``, ``Memcpy...``) beside the
    operators whose self device time already holds them, so only the operators' rows (CPU
    events) are summed, else the device time would be counted twice."""
    self_us: dict[str, float] = {}
    matmul_flops = 0
    for event in events:
        if cuda and event.device_type != DeviceType.CPU:
            continue
        spent = event.self_device_time_total if cuda else event.self_cpu_time_total
        self_us[event.key] = self_us.get(event.key, 0.0) + spent
        if op_group(event.key) == "matmul":
            matmul_flops += event.flops or 0
    return self_us, matmul_flops


def profile_pruning(case: BenchCase, device: str = "cpu", top: int = 8) -> dict:
    """Prune ``case`` (in place) with the fast schedule under ``torch.profiler``.

    Returns the pruning's wall seconds under the profiler, the profiled self time in seconds
    (``self_s``) and its split by group (``groups``: seconds and share), the ``top`` operators by
    self time, the matmul FLOPs and the throughput they reach (``matmul_gflops_s``), and the
    pruner's own stage timing.
    """
    problem = case.problem(device)
    cuda = problem.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, with_flops=True) as profiler:
        wall = time.perf_counter()
        result = KPrunePruner().prune(problem)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - wall
    self_us, matmul_flops = self_times(profiler.key_averages(), cuda)
    total_us = sum(self_us.values())
    groups: dict[str, float] = {}
    for name, spent in self_us.items():
        groups[op_group(name)] = groups.get(op_group(name), 0.0) + spent
    matmul_s = groups.get("matmul", 0.0) / 1e6
    return {
        "wall_s": wall,
        "self_s": total_us / 1e6,
        "clock": "cuda kernels" if cuda else "cpu",
        "groups": {name: {"s": spent / 1e6, "share": spent / total_us if total_us else 0.0}
                   for name, spent in sorted(groups.items(), key=lambda item: -item[1])},
        "top_ops": [{"op": name, "s": spent / 1e6, "share": spent / total_us if total_us else 0.0}
                    for name, spent in sorted(self_us.items(), key=lambda item: -item[1])[:top]],
        "matmul_tflop": matmul_flops / 1e12,
        "matmul_gflops_s": matmul_flops / matmul_s / 1e9 if matmul_s else None,
        "stages": dict(result.timing),
    }


def matmul_throughput(shape: Sequence[int], device: str = "cpu", dtype: torch.dtype = torch.float32,
                      repeats: int = 20) -> float:
    """GFLOP/s of a plain ``(m, k) @ (k, n)`` matmul of ``shape`` = ``(m, k, n)`` on ``device``:
    the best of ``repeats`` timings after one warm-up (wall clock, so on a busy CPU it is low)."""
    m, k, n = shape
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        if a.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if a.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / min(times[1:]) / 1e9
