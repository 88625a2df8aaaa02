"""``kprune bench``: latency of one checkpoint, timed in turns with its dense model when given."""

from __future__ import annotations

import json

from omegaconf import DictConfig
from rich.table import Table

from kprune_cli.bench.latency import interleaved_latency
from kprune_cli.config_values import check_int, check_optional_int
from kprune_cli.console import console, make_progress
from kprune_cli.errors import UserError
from kprune_cli.models.adapters import get_adapter
from kprune_cli.devices import resolve_device
from kprune_cli.models.loading import load_model
from kprune_cli.resolve import resolve_model_path
from kprune_cli.tasks.spec import get_task


def run_bench(cfg: DictConfig) -> list[dict]:
    """Time ``cfg.checkpoint`` (and ``cfg.dense``) at each batch size; print a table and one JSON line."""
    task = get_task(str(cfg.task.name))
    device = resolve_device(str(cfg.device))
    repeats = check_int("repeats", cfg.repeats, 1)
    batch_sizes = [check_int("batch_sizes", size, 1) for size in cfg.batch_sizes]
    if cfg.seq_len is None and task.avg_seq_len is None:
        raise UserError(f"task={task.name} has no tabled average sequence length: pass seq_len=<tokens>")
    seq_len = check_optional_int("seq_len", cfg.seq_len, 1) or round(task.avg_seq_len)
    paths = {"checkpoint": str(cfg.checkpoint)} | ({"dense": str(cfg.dense)} if cfg.dense is not None else {})
    models, flops = {}, {}
    for role, path in paths.items():
        model, _ = load_model(resolve_model_path(path, task, device)[0], task, device)
        adapter = get_adapter(model)
        models[role] = model
        flops[role] = adapter.flops(seq_len).total(adapter.structure())

    rows = []
    with make_progress() as progress:
        bar = progress.add_task("bench", total=len(batch_sizes))
        for batch_size in batch_sizes:
            progress.update(bar, description=f"bench batch {batch_size} x {seq_len} tokens")
            figures = interleaved_latency(list(models.values()), batch_size, seq_len, device, repeats=repeats)
            rows.append(_row(batch_size, seq_len, dict(zip(models, figures)), flops))
            progress.advance(bar)
    _print_table(rows)
    print(json.dumps({"task": task.name, "device": str(device), "models": paths, "rows": rows}))
    return rows


def _row(batch_size: int, seq_len: int, figures: dict[str, dict], flops: dict[str, float]) -> dict:
    """One batch size's figures per model role, with the speedup over the dense model where timed."""
    row = {"batch_size": batch_size, "seq_len": seq_len, **figures}
    if "dense" in figures:
        row["speedup"] = figures["dense"]["median_ms"] / figures["checkpoint"]["median_ms"]
        row["flops_ratio"] = flops["dense"] / flops["checkpoint"]
    return row


def _print_table(rows: list[dict]) -> None:
    table = Table(title="kprune bench (median ms per batch)")
    for column in ("batch", "seq", "checkpoint", "dense", "speedup", "FLOPs ratio"):
        table.add_column(column, justify="right")
    for row in rows:
        dense = row.get("dense")
        table.add_row(str(row["batch_size"]), str(row["seq_len"]), f"{row['checkpoint']['median_ms']:.2f}",
                      f"{dense['median_ms']:.2f}" if dense else "-",
                      f"{row['speedup']:.2f}x" if dense else "-", f"{row['flops_ratio']:.2f}x" if dense else "-")
    console.print(table)
