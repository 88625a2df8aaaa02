"""Pruning cost: wall time, CPU time and peak memory of K-prune variants on a case, and their agreement.

A variant is a pruner built from K-prune's settings (:data:`VARIANTS`): the fast schedule
(``fast``), the same with the measurement passes autocast to bf16 or fp16 (``fast-bf16``,
``fast-fp16``), and the reference schedule (``reference``, :mod:`benchmarks.reference`).
:func:`run_variant` runs one in this process; :func:`run_isolated` runs it in a fresh process
(``python -m benchmarks.worker``) so that its peak memory is its own: the CPU peak resident
memory (Linux ``VmHWM``, reset once the case is loaded; elsewhere ``ru_maxrss``) less the resident
memory once the case is loaded, or CUDA ``max_memory_allocated`` less what was allocated before.
"""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from benchmarks.cases import BenchCase, load_case
from benchmarks.reference import ReferenceKPrune
from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.masks import Masks
from kprune_cli.pruners.kprune.pruner import KPrunePruner
from kprune_cli.runtime.memory import peak_resident_mb, reset_peak_resident, resident_mb

REPO_ROOT = Path(__file__).resolve().parents[1]
"""Where ``python -m benchmarks.worker`` is found (the harness is not part of the installed package)."""

VARIANTS: dict[str, Callable[[], object]] = {
    "reference": lambda: ReferenceKPrune(KPrunePruner()),
    "fast": lambda: KPrunePruner(),
    "fast-bf16": lambda: KPrunePruner(autocast="bf16"),
    "fast-fp16": lambda: KPrunePruner(autocast="fp16"),
}


@dataclass
class VariantRun:
    """One pruning run: seconds (wall and process CPU), stage seconds, memory (MB, ``None`` when
    not measured), and what it decided: ``masks`` and the tuned output projections ``weights``."""

    variant: str
    wall_s: float
    cpu_s: float
    stages: dict[str, float]
    peak_mb: float | None
    masks: Masks = field(repr=False)
    weights: dict[str, torch.Tensor] = field(repr=False)

    def figures(self) -> dict:
        """The JSON-able part."""
        return {key: value for key, value in asdict(self).items() if key not in ("masks", "weights")}


def tuned_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The output projections' weights (what KPWT tunes), on the CPU, by ``"<layer>.<kind>"``."""
    return {f"{index}.{kind}": parts.out_proj(kind).weight.detach().cpu().clone()
            for index, parts in enumerate(get_adapter(model).layers()) for kind in ("mha", "ffn")}


def run_variant(case: BenchCase, variant: str, device: str = "cpu") -> VariantRun:
    """Prune ``case`` (in place: copy it first to reuse it) with ``variant`` in this process.

    ``peak_mb`` is the memory the run added at its peak: CUDA allocations on a GPU; on the CPU
    the peak resident memory over the resident memory at the start. Memory that earlier work in
    this process freed to the allocator but not to the system hides part of the peak: for
    figures, use :func:`run_isolated`.
    """
    problem = case.problem(device)
    pruner = VARIANTS[variant]()
    gc.collect()
    cuda = problem.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_peak_resident()
        before = resident_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    result = pruner.prune(problem)
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else peak_resident_mb() - before
    masks = Masks([m.cpu() for m in result.masks.heads], [m.cpu() for m in result.masks.neurons])
    return VariantRun(variant, wall, cpu, dict(result.timing), max(peak, 0.0), masks, tuned_weights(problem.model))


def run_isolated(case_dir: Path, variant: str, device: str = "cpu", threads: int | None = None,
                 timeout: float | None = None) -> VariantRun:
    """:func:`run_variant` in a fresh Python process on the case saved in ``case_dir``, with
    ``threads`` CPU threads (default: torch's)."""
    out = case_dir / f"run-{variant}"
    command = [sys.executable, "-m", "benchmarks.worker", str(case_dir), variant, str(out), device,
               *([str(threads)] if threads else [])]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    if finished.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({variant} on {case_dir.name}):\n{finished.stderr[-3000:]}")
    figures = json.loads((out / "figures.json").read_text())
    decided = torch.load(out / "decided.pt", weights_only=True)
    return VariantRun(masks=Masks(decided["heads"], decided["neurons"]), weights=decided["weights"], **figures)


def save_run(run: VariantRun, out: Path) -> None:
    """Write a run where :func:`run_isolated` reads it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.json").write_text(json.dumps(run.figures()))
    torch.save({"heads": run.masks.heads, "neurons": run.masks.neurons, "weights": run.weights}, out / "decided.pt")


def agreement(a: VariantRun, b: VariantRun) -> dict:
    """How far two runs' decisions are apart: identical masks?, the fraction of equal keep
    decisions, and the largest difference between tuned weights."""
    keep_a = torch.cat(a.masks.heads + a.masks.neurons) != 0
    keep_b = torch.cat(b.masks.heads + b.masks.neurons) != 0
    return {
        "masks_equal": bool(torch.equal(keep_a, keep_b)),
        "keep_agreement": float((keep_a == keep_b).float().mean()),
        "max_weight_diff": max(float((a.weights[key] - b.weights[key]).abs().max()) for key in a.weights),
    }


def compare_schedules(case_dir: Path, variants: Sequence[str] = ("reference", "fast"), device: str = "cpu",
                      isolate: bool = True, threads: int | None = None) -> dict:
    """Run ``variants`` on the saved case (each in a fresh process with ``threads`` threads when
    ``isolate``) and compare each with the first: its figures, ``speedup`` (first's wall time /
    its own), ``cpu_speedup`` (same with process CPU time), ``memory_ratio`` (first's peak / its
    own) and :func:`agreement`."""
    runs = [run_isolated(case_dir, v, device, threads) if isolate else run_variant(load_case(case_dir), v, device)
            for v in variants]
    first = runs[0]
    rows = []
    for run in runs:
        row = run.figures()
        if run is not first:
            row.update(speedup=first.wall_s / run.wall_s, cpu_speedup=first.cpu_s / run.cpu_s,
                       memory_ratio=first.peak_mb / run.peak_mb if run.peak_mb else None, **agreement(first, run))
        rows.append(row)
    return {"case": load_case(case_dir).describe(), "device": device, "runs": rows}


def fit_power(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The exponent ``b`` of the least-squares fit ``y ≈ a · x^b`` (a line in log-log)."""
    lx = torch.tensor([math.log(x) for x in xs], dtype=torch.float64)
    ly = torch.tensor([math.log(y) for y in ys], dtype=torch.float64)
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())
