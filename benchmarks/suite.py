"""The benchmark suite behind ``make bench``: pruning cost, its scaling, and pruned models' speed.

1. **Pruning cost**: the fast K-prune schedule against the reference one (and the fast one with
   autocast measurement) on the main case (MiniLM on MRPC) and on a large random case (BERT-base
   shape): wall and CPU time, peak memory, identical masks and tuned weights asserted.
2. **Scaling**: the fast schedule's time against the sample size and against depth, with the
   fitted growth exponent (time ∝ tokensᵇ; b ≈ 1 expected).
3. **Inference**: latency and throughput of magnitude-pruned models against the dense one, next
   to their FLOPs ratio.
4. **Profile**: where the fast schedule's time goes on the main case (operator groups from
   ``torch.profiler``), and the matmul throughput its passes reach against plain matmuls.

:func:`run_suite` returns every figure as one JSON-able dict.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from rich.console import Console

from benchmarks.cases import BERT_BASE_SHAPE, BenchCase, load_case, minilm_mrpc, random_case, truncate
from benchmarks.inference import inference_speed
from benchmarks.profile import matmul_throughput, profile_pruning
from benchmarks.pruning import compare_schedules, fit_power, run_isolated, run_variant
from kprune_cli.models.adapters import get_adapter
from kprune_cli.runtime.hardware import describe_cpu, native_matmul

CaseFactory = Callable[[int], BenchCase]
"""Builds a case from a number of calibration tokens."""


@dataclass
class Settings:
    """What the suite runs. ``main_case`` / ``large_case`` build the cases from a token count
    (``large_case=None`` skips it); ``isolate`` runs each pruning in a fresh process."""

    main_tokens: int = 4000
    large_tokens: int = 512
    scaling_tokens: Sequence[int] = (2000, 4000, 8000, 16000)
    depths: Sequence[int] = (2, 4, 6)
    depth_tokens: int = 2000
    rates: Sequence[float] = (0.4, 0.6, 0.8)
    batch_sizes: Sequence[int] = (1, 32)
    repeats: int = 10
    device: str = "cpu"
    threads: int | None = None
    isolate: bool = True
    main_case: CaseFactory = minilm_mrpc
    large_case: CaseFactory | None = field(
        default=functools.partial(random_case, "bert-base-random", **BERT_BASE_SHAPE))

    @property
    def autocast_variants(self) -> tuple[str, ...]:
        """The fast schedule with autocast measurement, in each half precision the device multiplies
        natively (elsewhere it is emulated and only slower: nothing worth timing)."""
        device = torch.device(self.device)
        return tuple(f"fast-{name}" for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))
                     if native_matmul(device, dtype) and (device.type == "cuda" or name == "bf16"))

    def describe(self) -> dict:
        return {
            "main_tokens": self.main_tokens, "large_tokens": self.large_tokens,
            "scaling_tokens": list(self.scaling_tokens), "depths": list(self.depths),
            "depth_tokens": self.depth_tokens, "rates": list(self.rates), "batch_sizes": list(self.batch_sizes),
            "repeats": self.repeats, "device": self.device, "threads": self.threads or torch.get_num_threads(),
            "isolate": self.isolate,
        }


QUICK = dict(main_tokens=1000, large_tokens=128, scaling_tokens=(500, 1000, 2000), depths=(1, 2, 3),
             depth_tokens=500, repeats=3)
"""Overrides of :class:`Settings` for ``--quick`` (about 1-2 minutes on 2 CPU cores)."""
FULL = dict(main_tokens=8000, large_tokens=2048, scaling_tokens=(25000, 50000, 100000, 200000),
            depths=(2, 4, 6), depth_tokens=8000, repeats=30)
"""Overrides of :class:`Settings` for ``--full`` (the paper's sample sizes; long on a CPU)."""


def environment() -> dict:
    """Where the figures come from, and how busy the machine was when the suite started."""
    return {
        "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(), "cpu_capability": describe_cpu(),
        "cpu_native_bf16": native_matmul(torch.device("cpu"), torch.bfloat16),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": load_average(),
    }


def load_average() -> float | None:
    """The machine's 1-minute load average (``None`` where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def busy_warning(figures: dict) -> str | None:
    """A warning when other work competed for the CPU during the suite (load above the core
    count at its start or end), which makes CPU timings unreliable, or ``None``."""
    env = figures["environment"]
    loads = [load for load in (env["load_average"], env.get("load_average_after")) if load is not None]
    if not loads or env["cpu_count"] is None or max(loads) <= env["cpu_count"]:
        return None
    return (f"the machine was busy (load average up to {max(loads):.1f} on {env['cpu_count']} cores): "
            f"timings are unreliable; rerun on an idle machine or with --threads 1")


class Suite:
    """Runs the sections with ``settings``, keeping cases in a scratch directory, and prints progress."""

    def __init__(self, settings: Settings, console: Console | None = None) -> None:
        self.settings = settings
        self.console = console or Console(stderr=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="kprune-bench-"))

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _save(self, case: BenchCase, label: str) -> Path:
        return case.save(self.workdir / label)

    def _compare(self, case_dir: Path, variants: Sequence[str]) -> dict:
        s = self.settings
        return compare_schedules(case_dir, variants, s.device, isolate=s.isolate, threads=s.threads)

    def _time_fast(self, case_dir: Path) -> dict:
        s = self.settings
        if s.isolate:
            return run_isolated(case_dir, "fast", s.device, s.threads).figures()
        return run_variant(load_case(case_dir), "fast", s.device).figures()

    def pruning_cost(self) -> list[dict]:
        """Reference vs fast (vs autocast) on the main case; reference vs fast on the large case."""
        s = self.settings
        results = []
        plans = [(s.main_case, s.main_tokens, ("reference", "fast", *s.autocast_variants))]
        if s.large_case is not None:
            plans.append((s.large_case, s.large_tokens, ("reference", "fast")))
        for factory, tokens, variants in plans:
            case = factory(tokens)
            self.console.print(f"[bold]pruning cost[/]: {case.name}, {case.sample.num_tokens} tokens, "
                               f"variants {', '.join(variants)}")
            result = self._compare(self._save(case, f"cost-{case.name}"), variants)
            for row in result["runs"][1:]:
                if row["variant"] == "fast" and not (row["masks_equal"] and row["max_weight_diff"] <= 1e-5):
                    raise AssertionError(f"the fast schedule disagrees with the reference on {case.name}: {row}")
            results.append(result)
        return results

    def scaling(self) -> dict:
        """Fast-schedule time against tokens (main case) and against depth (main case truncated).

        Small samples carry relatively more padding (a batch of 32 drawn sequences spans a wider
        range of lengths), so time grows a little slower than the real tokens and about linearly
        in the padded positions the passes compute."""
        s = self.settings
        by_tokens = []
        for tokens in s.scaling_tokens:
            case = s.main_case(tokens)
            self.console.print(f"[bold]scaling[/]: {case.name}, {case.sample.num_tokens} tokens")
            by_tokens.append({"tokens": case.sample.num_tokens, "positions": case.positions,
                              **self._time_fast(self._save(case, f"tokens-{tokens}"))})
        by_depth = []
        base = s.main_case(s.depth_tokens)
        for depth in s.depths:
            case = copy.deepcopy(base)
            truncate(case.model, depth)
            self.console.print(f"[bold]scaling[/]: {case.name}, {depth} layers, {case.sample.num_tokens} tokens")
            by_depth.append({"layers": depth, **self._time_fast(self._save(case, f"depth-{depth}"))})
        return {
            "tokens": by_tokens, "depth": by_depth,
            "tokens_exponent": _exponent([r["tokens"] for r in by_tokens], [r["wall_s"] for r in by_tokens]),
            "tokens_exponent_cpu": _exponent([r["tokens"] for r in by_tokens], [r["cpu_s"] for r in by_tokens]),
            "positions_exponent_cpu": _exponent([r["positions"] for r in by_tokens], [r["cpu_s"] for r in by_tokens]),
            "depth_exponent": _exponent([r["layers"] for r in by_depth], [r["wall_s"] for r in by_depth]),
        }

    def inference(self) -> list[dict]:
        """Dense vs magnitude-pruned main model: latency at the task's average sequence length."""
        s = self.settings
        case = s.main_case(64)
        seq_len = round(case.task.avg_seq_len)
        dtypes = (None, torch.float16, torch.bfloat16) if s.device == "cuda" else (None,)
        self.console.print(f"[bold]inference[/]: {case.name}, rates {list(s.rates)}, batch sizes "
                           f"{list(s.batch_sizes)}, sequence length {seq_len}")
        return inference_speed(case.model, case.task, s.rates, s.batch_sizes, seq_len, s.device, s.repeats, dtypes)

    def profile(self) -> dict:
        """The fast schedule on the main case under the profiler, and plain matmuls of the shape of
        its FFN projections (the largest micro-batch's positions × hidden × intermediate) in
        float32 and in the half precisions autocast could use (bfloat16; on CUDA float16 too)."""
        s = self.settings
        case = s.main_case(s.main_tokens)
        self.console.print(f"[bold]profile[/]: {case.name}, {case.sample.num_tokens} tokens, fast schedule")
        positions = max(int(batch["attention_mask"].numel()) for batch in case.sample.batches)
        ffn = get_adapter(case.model).layers()[0].out_proj("ffn")
        shape = (positions, ffn.out_features, ffn.in_features)
        figures = profile_pruning(case, s.device)
        dtypes = (torch.float32, torch.bfloat16) + ((torch.float16,) if s.device == "cuda" else ())
        figures.update(case=case.describe(), plain_matmul_shape=list(shape),
                       plain_matmul_gflops_s={str(dtype).removeprefix("torch."): matmul_throughput(shape, s.device, dtype)
                                              for dtype in dtypes})
        return figures


def _exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    return fit_power(xs, ys) if len(xs) > 1 else None


def run_suite(settings: Settings, sections: Sequence[str] = ("pruning", "scaling", "inference", "profile"),
              console: Console | None = None) -> dict:
    """Run the chosen ``sections`` and return their figures with the settings and environment."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    suite = Suite(settings, console)
    figures: dict = {"settings": settings.describe(), "environment": environment()}
    try:
        if "pruning" in sections:
            figures["pruning"] = suite.pruning_cost()
        if "scaling" in sections:
            figures["scaling"] = suite.scaling()
        if "inference" in sections:
            figures["inference"] = suite.inference()
        if "profile" in sections:
            figures["profile"] = suite.profile()
    finally:
        suite.close()
    figures["environment"]["load_average_after"] = load_average()
    return figures
