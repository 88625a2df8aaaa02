"""``constraint=latency``: the latency budget a run prunes to, and the measured speedup it reached.

Before any pruning work, :func:`latency_cost` gets the table of the model's shape on the chosen
runtime (cached or measured, :mod:`kprune_cli.core.latency_table`) and refuses a ``rate`` that even
emptying every sub-layer would not reach. After pruning, :func:`verify_speedup` times the dense and
the pruned model in turns on the same runtime and shape (with ``latency.quantize=int8``, both quantized
as ``kprune export quantize=int8`` quantizes them, beside the dense float32 model) and gives the
report's ``latency`` block.
A missed target may be pruned once more (``latency.replan``) to the target :func:`replan_rate` corrects
by how far the table's prediction was off.
"""

from __future__ import annotations

import random
import statistics
from typing import Any, Sequence

import torch
from rich.progress import Progress
from transformers import PreTrainedModel

from kprune_cli.config.settings import LatencyOptions
from kprune_cli.core.latency_table import WARMUP, TableSettings, load_or_measure
from kprune_cli.core.runners import Runner, RuntimeShape, torch_threads
from kprune_cli.models.latency_table import LatencyCost, LatencyTable
from kprune_cli.runtime.allocator import serving_note
from kprune_cli.runtime.device import resolve_device
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.timing import time_in_turns
from kprune_cli.tasks.spec import TaskSpec

MET_FRACTION = 0.95
"""A latency target is met when the measured speedup's lower 95% bound is at least this fraction of it."""

BOOTSTRAP_SAMPLES = 2000


def runtime_shape(options: LatencyOptions, task: TaskSpec, run_device: torch.device) -> RuntimeShape:
    """Where and how ``options`` time a model: ``device`` null = cpu for onnxruntime, else the run's;
    ``threads`` null = torch's; ``seq_len`` null = the task's average length."""
    if options.seq_len is None and task.avg_seq_len is None:
        raise UserError(f"task={task.name} has no tabled average sequence length: pass latency.seq_len=<tokens>")
    if options.device is not None:
        device = resolve_device(options.device)
    else:
        device = torch.device("cpu") if options.runtime == "onnxruntime" else run_device
    return RuntimeShape(runtime=options.runtime, device=device, threads=options.threads or torch.get_num_threads(),
                        batch_size=options.batch_size, seq_len=options.seq_len or round(task.avg_seq_len),
                        quantize=options.quantize)


def table_settings(options: LatencyOptions) -> TableSettings:
    return TableSettings(repeats=options.repeats, ffn_step=options.ffn_step, configurations=options.configurations,
                         max_error=options.max_error)


def latency_cost(model: PreTrainedModel, shape: RuntimeShape, settings: TableSettings, rate: float,
                 progress: Progress | None = None, notes: list[str] | None = None) -> LatencyCost:
    """The cost model of ``model``'s latency table on ``shape``; a :class:`UserError` when ``rate``
    asks for more than emptying every sub-layer gives."""
    table = load_or_measure(model, shape, settings, progress, notes)
    if notes is not None and shape.runtime == "torch" and shape.device.type == "cpu" and (note := serving_note()):
        notes.append(note)
    check_reachable(table, rate, shape)
    return LatencyCost(table)


def check_reachable(table: LatencyTable, rate: float, shape: RuntimeShape) -> None:
    """A :class:`UserError` naming the largest reachable speedup when ``rate`` asks for more."""
    reachable = table.reachable_speedup(table.full())
    if 1.0 / (1.0 - rate) > reachable:
        largest = 1.0 - 1.0 / reachable
        raise UserError(f"constraint=latency rate={rate} asks for a {1 / (1 - rate):.2f}x speedup, but even emptying "
                        f"every sub-layer runs only {reachable:.2f}x faster on {shape.describe()}: give rate < "
                        f"{largest:.3f} (embeddings and the task head stay)")


def verify_speedup(dense: PreTrainedModel, pruned: PreTrainedModel, shape: RuntimeShape, repeats: int,
                   table: LatencyTable, rate: float, pruned_structure: list[dict[str, int]],
                   times: Sequence[list[float]] | None = None, min_seconds: float = 0.0) -> dict[str, Any]:
    """The report's ``latency`` block: ``dense`` and ``pruned`` timed in turns on ``shape`` (``repeats``
    rounds, more if they would take under ``min_seconds``; ``times``: given instead, for tests), the
    median speedup with a 95% bootstrap interval
    over the rounds, the table's predictions (of the pruned model's milliseconds, and of the speedup:
    the ratio also holds where the table's timing ran a few percent slower or faster than two models
    timed in turns do), and whether the target ``1 / (1 - rate)`` was met (the interval's lower bound
    at least :data:`MET_FRACTION` of it). On a quantized runtime (``shape.quantize``) the dense float32
    model is timed in the same turns too: ``dense_float32_ms`` and ``speedup_over_float32`` (with its
    interval) say how much faster the pruned int8 model runs than the model it replaces."""
    if times is None:
        times = time_verification(dense, pruned, shape, repeats, min_seconds)
    dense_times, pruned_times = times[:2]
    dense_ms, pruned_ms = statistics.median(dense_times), statistics.median(pruned_times)
    speedup = dense_ms / pruned_ms
    low, high = bootstrap_interval(dense_times, pruned_times)
    target = 1.0 / (1.0 - rate)
    predicted, predicted_dense = table.predict_ms(pruned_structure), table.predict_ms(table.full())
    predicted_speedup = predicted_dense / predicted
    block = {
        "runtime": shape.runtime, "quantize": shape.quantize, "device": str(shape.device), "threads": shape.threads,
        "batch_size": shape.batch_size, "seq_len": shape.seq_len, "repeats": len(dense_times),
        "dense_ms": dense_ms, "pruned_ms": pruned_ms,
        "predicted_ms": predicted, "predicted_dense_ms": predicted_dense,
        "prediction_error": predicted / pruned_ms - 1.0,
        "predicted_speedup": predicted_speedup,
        "speedup_prediction_error": predicted_speedup / speedup - 1.0,
        "speedup": speedup, "speedup_ci": [low, high], "target_speedup": target,
        "met": low >= MET_FRACTION * target,
        "table_fit": dict(table.fit),
    }
    if shape.quantize is not None:
        float32_times = times[2]
        block["dense_float32_ms"] = statistics.median(float32_times)
        block["speedup_over_float32"] = block["dense_float32_ms"] / pruned_ms
        block["speedup_over_float32_ci"] = list(bootstrap_interval(float32_times, pruned_times))
    return block


def time_verification(dense: PreTrainedModel, pruned: PreTrainedModel, shape: RuntimeShape,
                      repeats: int, min_seconds: float = 0.0) -> list[list[float]]:
    """Milliseconds per round of ``dense`` and ``pruned`` timed in turns on ``shape`` (:func:`time_on_runtimes`);
    on a quantized runtime, of the dense model in float32 as a third."""
    timed = [(dense, shape), (pruned, shape)] + ([(dense, shape.float32())] if shape.quantize is not None else [])
    return time_on_runtimes(timed, repeats, min_seconds)


def time_on_runtimes(models: Sequence[tuple[PreTrainedModel, RuntimeShape]], repeats: int,
                     min_seconds: float = 0.0) -> list[list[float]]:
    """Milliseconds per round of each ``(model, shape)`` on its shape's runtime, all timed in turns
    (``repeats`` rounds after :data:`WARMUP`, more if they would take under ``min_seconds``; with the
    first shape's threads)."""
    runners: dict[RuntimeShape, Runner] = {}
    try:
        with torch_threads(models[0][1].threads):
            calls = [runners.setdefault(shape, Runner(shape)).prepare(model) for model, shape in models]
            return time_in_turns(calls, repeats, WARMUP, min_seconds)
    finally:
        for runner in runners.values():
            runner.close()


def float32_over_quantized(dense: PreTrainedModel, shape: RuntimeShape, repeats: int,
                           min_seconds: float = 0.0) -> float:
    """How many times longer the dense model takes in float32 than quantized on ``shape``: both timed in
    turns (:func:`time_on_runtimes`), medians (``latency.baseline=float32``)."""
    float32_times, quantized_times = time_on_runtimes([(dense, shape.float32()), (dense, shape)], repeats,
                                                      min_seconds)
    return statistics.median(float32_times) / statistics.median(quantized_times)


def rate_over_runtime(rate: float, float32_ratio: float, shape: RuntimeShape) -> float:
    """The rate of the quantized dense model's time that leaves ``1 - rate`` of the dense float32 model's
    time, where float32 takes ``float32_ratio`` times as long; a :class:`UserError` when the quantized dense
    model is already that fast."""
    planned = 1.0 - (1.0 - rate) * float32_ratio
    if planned <= 0.0:
        raise UserError(f"latency.baseline=float32 rate={rate} asks for {1 / (1 - rate):.2f}x over float32, and the "
                        f"dense model runs {float32_ratio:.2f}x faster than float32 on {shape.describe()} without "
                        f"pruning: give rate > {1 - 1 / float32_ratio:.3f}")
    return planned


def baseline_note(rate: float, planned: float, float32_ratio: float, shape: RuntimeShape) -> str:
    """The report's note on what ``latency.baseline=float32`` made of ``rate``."""
    return (f"latency.baseline=float32: the dense model ran {float32_ratio:.2f}x faster on {shape.runtime_name} "
            f"than in float32, so rate {rate} of the float32 time ({1 / (1 - rate):.2f}x) was pruned as rate "
            f"{planned:.4f} of the {shape.runtime_name} time ({1 / (1 - planned):.2f}x)")


def float32_baseline(measured: dict[str, Any], rate: float, float32_ratio: float) -> dict[str, Any]:
    """The ``latency.baseline`` block of a ``latency.baseline=float32`` run: the target over the dense float32
    model, the ratio measured before pruning, and whether the verification's speedup over float32 met it."""
    target = 1.0 / (1.0 - rate)
    return {"name": "float32", "rate": rate, "target_speedup": target, "float32_ratio": float32_ratio,
            "met": measured["speedup_over_float32_ci"][0] >= MET_FRACTION * target}


def replan_rate(measured: dict[str, Any], table: LatencyTable) -> float | None:
    """The rate to plan a second pruning with after ``measured`` (a :func:`verify_speedup` block) missed:
    the target speedup times ``predicted / measured`` speedup, so that a table that was optimistic by
    some factor is asked for that much more. ``None`` when the prediction was not optimistic (a
    re-plan would ask for the same) or the corrected target is beyond what emptying every sub-layer gives."""
    correction = measured["predicted_speedup"] / measured["speedup"]
    corrected = measured["target_speedup"] * correction
    if correction <= 1.0 or corrected >= table.reachable_speedup(table.full()):
        return None
    return 1.0 - 1.0 / corrected


def replan_record(first: dict[str, Any], planned_rate: float) -> dict[str, Any]:
    """The report's ``latency.replan`` block: the first plan's measured and predicted speedup, and the
    rate the second plan was pruned to."""
    return {"first_speedup": first["speedup"], "first_speedup_ci": first["speedup_ci"],
            "first_predicted_speedup": first["predicted_speedup"], "planned_rate": planned_rate,
            "planned_speedup": 1.0 / (1.0 - planned_rate)}


def replan_note(first: dict[str, Any], planned_rate: float) -> str:
    """The report's note on a re-plan."""
    return (f"latency target {first['target_speedup']:.2f}x missed at first ({first['speedup']:.2f}x measured, "
            f"{first['predicted_speedup']:.2f}x predicted): pruned once more from the dense model, planned for "
            f"{1.0 / (1.0 - planned_rate):.2f}x (rate {planned_rate:.4f}) to make up for the table's optimism "
            f"(latency.replan=false keeps the first plan)")


def replan_refused_note(first: dict[str, Any]) -> str:
    """The report's note when a missed target cannot be re-planned."""
    if first["predicted_speedup"] <= first["speedup"]:
        why = "the table was not optimistic (the measured speedup is at least the predicted one)"
    else:
        why = "the corrected target is beyond what emptying every sub-layer gives"
    return f"latency target {first['target_speedup']:.2f}x missed and not re-planned: {why}"


def bootstrap_interval(dense: Sequence[float], pruned: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of ``median(dense) / median(pruned)``, resampling whole
    rounds (a round's two times were taken together)."""
    generator = random.Random(seed)
    rounds = len(dense)
    ratios = []
    for _ in range(BOOTSTRAP_SAMPLES):
        picked = [generator.randrange(rounds) for _ in range(rounds)]
        ratios.append(statistics.median(dense[i] for i in picked) / statistics.median(pruned[i] for i in picked))
    ratios.sort()
    return ratios[int(0.025 * BOOTSTRAP_SAMPLES)], ratios[int(0.975 * BOOTSTRAP_SAMPLES) - 1]
