"""Measuring a latency table on the runtime a model is deployed on, checking that it adds up, caching it.

The parts (:class:`~kprune_cli.models.latency_table.LatencyTable`) are timed on models built with
the model's own code and random weights (:func:`~kprune_cli.models.structured.model_with_structure`):

- ``empty_layer_ms``: two emptied layers minus one (a layer with both sub-layers emptied);
- ``fixed_ms``: one emptied layer minus ``empty_layer_ms`` (embeddings, task head: what a model
  without layers would take; not every family's code runs without layers);
- ``mha_ms[h]``: one layer keeping ``h`` heads and no neuron, minus the emptied layer, ``h = 1..H``;
- ``ffn_ms``: one layer keeping ``n`` neurons and no head, minus the emptied layer, for ``n`` on a
  grid of step ``ffn_step`` from 0 to N.

Models are timed in groups, in turns (one batch of each per round, ``repeats`` rounds after 3
warm-up batches); each group also times reference models (the full and the emptied one-layer
model; for the check, the dense model), and a group's times are scaled by how much slower or
faster the machine ran its first reference than it did overall (clock and load drift between
groups of a few percent would otherwise show in the table). The width tables are then smoothed to be
non-decreasing (pooling adjacent violators): a runtime never gets slower by dropping a unit, but a
timer's noise may say so.

**Additivity check.** ``configurations`` random structures of the whole model (per sub-layer a
head count, or one of the timed FFN widths, drawn uniformly: the widths a search keeps, see
:meth:`~kprune_cli.models.latency_table.LatencyCost.priced_width`), with the dense and the emptied
model, are timed end to end; the measured
times are fitted as ``scale · Σ table + offset`` (least squares of the relative errors); when the
fit's worst relative error exceeds ``max_error`` (5%) the check is timed once more (the two medians
of each model averaged), and a second failure refuses the table with one line (it is kept beside the
cache as ``<key>.refused.json`` for a look). Its ``R²`` and worst error go
into the table (and the report).

**Cache.** A table is kept under ``$KPRUNE_CACHE/latency-tables/`` keyed by a fingerprint of what
it depends on (the model's shape, runtime, device model, threads, batch, sequence length, precision
and quantization settings, host allocator, library versions, grid, repeats); a table is only ever
reused for an identical fingerprint, else measured again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import transformers
from rich.progress import Progress
from transformers import PreTrainedModel

from kprune_cli.core.builtins import cache_dir
from kprune_cli.core.runners import Runner, RuntimeShape, torch_threads
from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.latency_table import LatencyTable
from kprune_cli.models.structured import model_with_structure
from kprune_cli.runtime.allocator import describe_allocator
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.hardware import cpu_model
from kprune_cli.runtime.timing import time_in_turns

TABLE_VERSION = 3
"""How tables are measured; part of the fingerprint, so that a table measured otherwise is never reused
(2: the additivity check draws FFN widths from the timed ones; 3: timed with glibc's malloc thresholds
pinned, :mod:`kprune_cli.runtime.allocator`)."""

GROUP_SIZE = 8
"""Models timed in turns at once (each group's models are all in memory together)."""

WARMUP = 3

Structure = list[dict[str, int]]
Timer = Callable[[Sequence[PreTrainedModel]], list[list[float]]]
"""Times models in turns: milliseconds per round, one list per model."""


@dataclass(frozen=True)
class TableSettings:
    """How a table is measured: ``repeats`` rounds per group, FFN widths every ``ffn_step`` neurons
    (``None``: N / 48 rounded to a multiple of 8, at least 8), ``configurations`` random whole models
    in the additivity check, refused above a worst relative error of ``max_error``; ``seed`` draws them."""

    repeats: int = 30
    ffn_step: int | None = None
    configurations: int = 20
    max_error: float = 0.05
    seed: int = 0

    def step_for(self, neurons: int) -> int:
        return self.ffn_step or max(8, round(neurons / 48 / 8) * 8)


def fingerprint(model: PreTrainedModel, shape: RuntimeShape, settings: TableSettings) -> dict[str, Any]:
    """What a table of ``model``'s shape on ``shape`` depends on; equal fingerprints may share a table."""
    config = model.config
    keys = ("model_type", "hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
            "vocab_size", "hidden_act", "_attn_implementation")
    device = (torch.cuda.get_device_name(shape.device) if shape.device.type == "cuda" else cpu_model())
    found = {
        "model": {key: getattr(config, key, None) for key in keys} | {"class": type(model).__name__},
        "table_version": TABLE_VERSION,
        "runtime": shape.runtime, "device": f"{shape.device.type}: {device}", "threads": shape.threads,
        "batch_size": shape.batch_size, "seq_len": shape.seq_len, "dtype": shape.quantize or "float32",
        "allocator": describe_allocator(),
        "ffn_step": settings.step_for(int(config.intermediate_size)), "repeats": settings.repeats,
        "configurations": settings.configurations, "seed": settings.seed,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    if shape.runtime == "onnxruntime":
        import onnxruntime

        found["versions"]["onnxruntime"] = onnxruntime.__version__
    if shape.quantize is not None:
        from kprune_cli.deploy.quantization import INT8_SETTINGS

        found["quantization"] = INT8_SETTINGS
    return found


def table_path(found: dict[str, Any]) -> Path:
    """Where the table of fingerprint ``found`` is cached."""
    digest = hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "latency-tables" / f"{digest}.json"


def load_or_measure(model: PreTrainedModel, shape: RuntimeShape, settings: TableSettings,
                    progress: Progress | None = None, notes: list[str] | None = None,
                    timer: Timer | None = None) -> LatencyTable:
    """The cached table of ``model``'s shape on ``shape`` when its fingerprint matches, else a new one,
    measured (:func:`measure_table`) and cached. ``notes`` gets one line saying which. A model whose
    layers are not all full is refused: the table times the config's full layers."""
    structure = get_adapter(model).structure()
    if any(layer != structure[0] for layer in structure) or structure[0]["heads"] != model.config.num_attention_heads:
        raise UserError("constraint=latency times the model's full layers, and this one has layers that are not all "
                        "full (it was pruned already): prune the dense model, or use constraint=flops")
    found = fingerprint(model, shape, settings)
    path = table_path(found)
    notes = notes if notes is not None else []
    if path.is_file():
        try:
            table = LatencyTable.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            table = None
        if table is not None and table.fingerprint == found and table.fit.get("worst_error", 1.0) <= settings.max_error:
            notes.append(f"latency table from the cache ({path}): {shape.describe()}")
            return table
        notes.append(f"the cached latency table {path} did not match this model and runtime, or not "
                     f"latency.max_error={settings.max_error:g}: measured again")
    table = measure_table(model, shape, settings, found, progress, timer)
    worst, fit = table.fit["worst_error"], table.fit
    if worst > settings.max_error:
        refused = path.with_suffix(".refused.json")
        write_table(table, refused)
        raise UserError(f"the latency table does not add up on this runtime: whole models run up to {worst:.1%} "
                        f"off its prediction (allowed {settings.max_error:.0%}, R² {fit['r2']:.3f} over "
                        f"{fit['configurations']} models, timed twice); time on a quieter machine or with more "
                        f"latency.repeats (the table is in {refused})")
    write_table(table, path)
    notes.append(f"latency table measured on {shape.describe()} (cached in {path})")
    return table


def write_table(table: LatencyTable, path: Path) -> None:
    """``table`` as JSON at ``path``, never half-written under that name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    staging.write_text(json.dumps(table.to_json(), indent=1) + "\n")
    staging.replace(path)


def measure_table(model: PreTrainedModel, shape: RuntimeShape, settings: TableSettings,
                  found: dict[str, Any] | None = None, progress: Progress | None = None,
                  timer: Timer | None = None) -> LatencyTable:
    """Time the parts and check additivity (see the module docstring): the table with its fit. A
    check whose worst error exceeds ``settings.max_error`` is timed once more and the two medians of
    each model averaged (a noisy round is the usual cause). ``timer`` replaces the runtime (tests)."""
    adapter = get_adapter(model)
    layers, heads = adapter.num_layers, adapter.layers()[0].num_heads
    neurons = adapter.layers()[0].num_neurons
    step = settings.step_for(neurons)
    widths = [*range(0, neurons, step), neurons]
    empty = {"heads": 0, "neurons": 0}
    parts: list[Structure] = [[empty, empty]] + [[{"heads": h, "neurons": 0}] for h in range(1, heads + 1)] \
        + [[{"heads": 0, "neurons": n}] for n in widths[1:]]
    checked = settings.configurations + 1  # the emptied model and the random ones (the dense one is a reference)
    bar = progress.add_task("latency table", total=len(parts) + checked) if progress else None
    with Timing(model, shape, settings, timer, progress, bar) as timing:
        times, (_, base) = timing.medians(parts, [[{"heads": heads, "neurons": neurons}], [empty]])
        added = [value - base for value in times]  # over the emptied one-layer model
        table = LatencyTable(
            fingerprint=found or fingerprint(model, shape, settings), num_layers=layers,
            fixed_ms=base - added[0], empty_layer_ms=added[0],
            mha_ms=(0.0, *non_decreasing(added[1:heads + 1])),
            ffn_widths=tuple(widths), ffn_ms=(0.0, *non_decreasing(added[heads + 1:])),
        )
        generator = random.Random(settings.seed)
        checks = [table.emptied()] + [
            [{"heads": generator.randint(0, heads), "neurons": generator.choice(widths)} for _ in range(layers)]
            for _ in range(settings.configurations)
        ]
        measured, (dense,) = timing.medians(checks, [table.full()])
        fitted = fit_additivity(table, [table.full(), *checks], [dense, *measured])
        if fitted.fit["worst_error"] > settings.max_error:
            if progress is not None:  # the second check's models join the bar's total
                progress.update(bar, total=len(parts) + 2 * checked,
                                description="latency table (additivity checked again)")
            again, (dense_again,) = timing.medians(checks, [table.full()])
            measured = [(first + second) / 2 for first, second in zip(measured, again)]
            fitted = fit_additivity(table, [table.full(), *checks], [(dense + dense_again) / 2, *measured])
    return fitted


def fit_additivity(table: LatencyTable, structures: Sequence[Structure], measured: Sequence[float]) -> LatencyTable:
    """``table`` with ``scale`` and ``offset`` fitted so that ``scale · raw + offset`` matches the
    ``measured`` milliseconds of whole models of ``structures``, and its ``fit`` figures (``r2``,
    ``worst_error``: the largest relative error, ``configurations``) and ``checks``."""
    raw = [table.raw_ms(structure) for structure in structures]
    scale, offset = relative_least_squares(raw, measured)
    predicted = [scale * x + offset for x in raw]
    mean_measured = statistics.fmean(measured)
    residual = sum((y - p) ** 2 for y, p in zip(measured, predicted))
    total = sum((y - mean_measured) ** 2 for y in measured)
    worst = max(abs(p - y) / y for y, p in zip(measured, predicted))
    fit = {"r2": 1.0 - residual / total if total else 1.0, "worst_error": worst, "configurations": len(structures)}
    checks = tuple({"raw_ms": x, "measured_ms": y} for x, y in zip(raw, measured))
    return replace(table, scale=scale, offset=offset, fit=fit, checks=checks)


def relative_least_squares(raw: Sequence[float], measured: Sequence[float]) -> tuple[float, float]:
    """``(scale, offset)`` minimising ``Σ ((scale · raw + offset − measured) / measured)²``: the
    relative errors the check bounds, so that small models count as much as large ones."""
    weights = [1.0 / y ** 2 for y in measured]
    total = sum(weights)
    mean_x = sum(w * x for w, x in zip(weights, raw)) / total
    mean_y = sum(w * y for w, y in zip(weights, measured)) / total
    spread = sum(w * (x - mean_x) ** 2 for w, x in zip(weights, raw))
    if spread == 0:
        return 1.0, mean_y - mean_x
    scale = sum(w * (x - mean_x) * (y - mean_y) for w, x, y in zip(weights, raw, measured)) / spread
    return scale, mean_y - scale * mean_x


def non_decreasing(values: Sequence[float]) -> list[float]:
    """The least-squares non-decreasing fit of ``values`` (pool adjacent violators), clipped at 0 (a
    width never runs faster than the emptied sub-layer)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (mean_a, count_a), (mean_b, count_b) = blocks[-2], blocks.pop()
            blocks[-1] = [(mean_a * count_a + mean_b * count_b) / (count_a + count_b), count_a + count_b]
    return [max(0.0, mean) for mean, count in blocks for _ in range(int(count))]


class Timing:
    """Builds models of given structures and times them in groups of :data:`GROUP_SIZE`, in turns."""

    def __init__(self, model: PreTrainedModel, shape: RuntimeShape, settings: TableSettings, timer: Timer | None,
                 progress: Progress | None, bar: Any) -> None:
        self.model, self.shape, self.settings = model, shape, settings
        self.timer, self.progress, self.bar = timer, progress, bar
        self.runner = Runner(shape) if timer is None else None

    def __enter__(self) -> "Timing":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.runner is not None:
            self.runner.close()

    def medians(self, structures: Sequence[Structure], references: Sequence[Structure]
                ) -> tuple[list[float], list[float]]:
        """Median milliseconds of a model of each of ``structures`` and of each of ``references``.

        The structures are timed in groups, each group with all the ``references``; a group's times
        are scaled by the ratio of the first reference's median over all groups to its median in
        that group, so that a machine running a few percent slower for one group (clock, load)
        does not show in the table."""
        size = GROUP_SIZE - len(references)
        groups: list[list[float]] = []
        for start in range(0, len(structures), size):
            group = [*structures[start:start + size], *references]
            models = [model_with_structure(self.model, structure) for structure in group]
            groups.append([statistics.median(kept) for kept in self._time(models)])
            if self.progress is not None:
                self.progress.advance(self.bar, len(group) - len(references))
        anchor = statistics.median(times[-len(references)] for times in groups)
        scaled = [[value * anchor / times[-len(references)] for value in times] for times in groups]
        found = [value for times in scaled for value in times[:-len(references)]]
        return found, [statistics.median(times[-len(references) + index] for times in scaled)
                       for index in range(len(references))]

    def _time(self, models: Sequence[PreTrainedModel]) -> list[list[float]]:
        if self.timer is not None:
            return self.timer(models)
        with torch_threads(self.shape.threads):
            calls = [self.runner.prepare(model) for model in models]
            return time_in_turns(calls, self.settings.repeats, WARMUP)
