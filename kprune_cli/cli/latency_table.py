"""``kprune latency-table``: the latency table of a model's shape on a runtime (measured, or from the
cache when its fingerprint matches), printed with its additivity check and cache path, and one JSON
line; with ``rate`` also whether ``constraint=latency`` can reach it."""

from __future__ import annotations

import json

from omegaconf import DictConfig
from rich.table import Table

from kprune_cli.config.settings import read_latency_options
from kprune_cli.config.values import check_rate, resolve_config
from kprune_cli.core.builtins import resolve_model_path
from kprune_cli.core.latency_budget import (
    baseline_note,
    check_reachable,
    float32_over_quantized,
    rate_over_runtime,
    runtime_shape,
    table_settings,
)
from kprune_cli.core.latency_table import load_or_measure, table_path
from kprune_cli.models.latency_table import LatencyTable
from kprune_cli.models.loading import load_model
from kprune_cli.runtime.console import console, make_progress
from kprune_cli.runtime.device import resolve_device
from kprune_cli.tasks.spec import get_task


def run_latency_table(cfg: DictConfig) -> LatencyTable:
    """Measure or load the table of ``cfg.checkpoint``'s shape on ``cfg.latency``; print it."""
    resolve_config(cfg)
    task = get_task(str(cfg.task.name))
    options = read_latency_options(cfg.latency)
    rate = None if cfg.rate is None else check_rate(cfg.rate)
    device = resolve_device(str(cfg.device))
    shape = runtime_shape(options, task, device)
    model, _ = load_model(resolve_model_path(str(cfg.checkpoint), task, device)[0], task, "cpu")
    notes: list[str] = []
    with make_progress() as progress:
        table = load_or_measure(model, shape, table_settings(options), progress, notes)
    _print_table(table, shape.describe())
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    if rate is not None:
        if options.baseline == "float32":  # rate is of the dense float32 model's time: as kprune run plans it
            float32_ratio = float32_over_quantized(model, shape, options.verify_repeats, options.verify_seconds)
            asked, rate = rate, rate_over_runtime(rate, float32_ratio, shape)
            console.print(f"[yellow]note:[/] {baseline_note(asked, rate, float32_ratio, shape)}",
                          highlight=False, soft_wrap=True)
        check_reachable(table, rate, shape)
        console.print(f"rate={rate:.4g} ({1 / (1 - rate):.2f}x) is reachable: emptying every sub-layer gives "
                      f"{table.reachable_speedup(table.full()):.2f}x", highlight=False)
    print(json.dumps({"path": str(table_path(table.fingerprint)), **table.to_json()}))
    return table


def _print_table(table: LatencyTable, where: str) -> None:
    """The parts, the fit and the predicted dense and emptied models."""
    parts = Table(title=f"latency table: {where} (ms)")
    for column in ("sub-layer", "width", "ms over emptied"):
        parts.add_column(column, justify="right")
    for heads, ms in enumerate(table.mha_ms):
        parts.add_row("MHA", str(heads), f"{ms:.3f}")
    for neurons, ms in zip(table.ffn_widths, table.ffn_ms):
        parts.add_row("FFN", str(neurons), f"{ms:.3f}")
    console.print(parts)
    fit = table.fit
    console.print(
        f"fixed (embeddings, head) {table.fixed_ms:.3f} ms · emptied layer {table.empty_layer_ms:.3f} ms · "
        f"{table.num_layers} layers · whole model = {table.scale:.3f} x table sum {table.offset:+.3f} ms "
        f"(R² {fit.get('r2', float('nan')):.4f}, worst error {fit.get('worst_error', float('nan')):.1%} over "
        f"{fit.get('configurations', 0)} models) · dense {table.predict_ms(table.full()):.2f} ms, emptied "
        f"{table.predict_ms(table.emptied()):.2f} ms",
        highlight=False, soft_wrap=True)
