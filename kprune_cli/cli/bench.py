"""``kprune bench``: latency of one checkpoint, timed in turns with its dense model when given, in
PyTorch (float32, or autocast to bf16 / fp16 with ``dtype``) and (with the ``.[deploy]`` extra, by
default on a CPU bench only) exported to ONNX and run by ONNX Runtime on the CPU."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from rich.table import Table

from kprune_cli.config.values import check_int, check_optional_int, check_precision
from kprune_cli.core.builtins import resolve_model_path
from kprune_cli.core.latency import interleaved_latency, latency_figures
from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.loading import load_model
from kprune_cli.runtime.console import console, make_progress
from kprune_cli.runtime.device import resolve_device
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.hardware import announce_device
from kprune_cli.runtime.precision import PRECISIONS
from kprune_cli.tasks.spec import get_task

ORT_KEY = "onnxruntime"  # a row's ONNX Runtime figures per model role
ORT_INT8_KEY = "onnxruntime_int8"  # the same for the int8 models (quantize=int8)


def run_bench(cfg: DictConfig) -> list[dict]:
    """Time ``cfg.checkpoint`` (and ``cfg.dense``) at each batch size; print a table and one JSON line."""
    task = get_task(str(cfg.task.name))
    device = resolve_device(str(cfg.device))
    repeats = check_int("repeats", cfg.repeats, 1)
    batch_sizes = [check_int("batch_sizes", size, 1) for size in cfg.batch_sizes]
    dtype = PRECISIONS[check_precision("dtype", cfg.dtype)]  # the precision PyTorch is timed in (None: float32)
    with_onnx = _onnx_wanted(cfg.onnx, device)
    quantize = _quantize_wanted(cfg.quantize, with_onnx)
    if cfg.seq_len is None and task.avg_seq_len is None:
        raise UserError(f"task={task.name} has no tabled average sequence length: pass seq_len=<tokens>")
    seq_len = check_optional_int("seq_len", cfg.seq_len, 1) or round(task.avg_seq_len)
    paths = {"checkpoint": str(cfg.checkpoint)} | ({"dense": str(cfg.dense)} if cfg.dense is not None else {})
    announce_device(device)
    models, flops = {}, {}
    for role, path in paths.items():
        model, _ = load_model(resolve_model_path(path, task, device)[0], task, device)
        adapter = get_adapter(model)
        models[role] = model
        flops[role] = adapter.flops(seq_len).total(adapter.structure())

    rows = []
    with tempfile.TemporaryDirectory(prefix="kprune-bench-") as scratch, make_progress() as progress:
        sessions = _onnx_sessions(models, Path(scratch)) if with_onnx else None
        int8 = _int8_sessions(models, Path(scratch)) if quantize else {}
        bar = progress.add_task("bench", total=len(batch_sizes))
        for batch_size in batch_sizes:
            progress.update(bar, description=f"bench batch {batch_size} x {seq_len} tokens")
            figures = interleaved_latency(list(models.values()), batch_size, seq_len, device, repeats=repeats,
                                          dtype=dtype)
            row = _row(batch_size, seq_len, dict(zip(models, figures)), flops)
            if sessions is not None:
                row |= _onnx_figures(models, sessions, int8, batch_size, seq_len, repeats)
            rows.append(row)
            progress.advance(bar)
    _print_table(rows)
    print(json.dumps({"task": task.name, "device": str(device), "models": paths, "rows": rows}))
    return rows


def _onnx_wanted(value: Any, device: torch.device) -> bool:
    """``onnx``: ``auto`` (on a CPU ``device``, when the ``.[deploy]`` extra is installed: ONNX Runtime
    runs on the CPU, so a GPU bench would take minutes to put CPU figures beside GPU ones), ``true``
    (required) or ``false``."""
    from kprune_cli.deploy.onnx_model import onnx_available, require_onnx

    if value == "auto":
        return device.type == "cpu" and onnx_available()
    if not isinstance(value, bool):
        raise UserError(f"onnx={value!r} is not allowed: give auto, true or false")
    if value:
        require_onnx()
    return value


def _quantize_wanted(value: Any, with_onnx: bool) -> str | None:
    """``quantize``: null or ``int8``, which times ONNX Runtime models and so needs ``with_onnx``."""
    from kprune_cli.deploy.quantization import check_quantize

    quantize = check_quantize(value)
    if quantize and not with_onnx:
        raise UserError(f"quantize={quantize} times ONNX Runtime models: it needs onnx=true (or auto, on a CPU "
                        f"bench with the .[deploy] extra installed)")
    return quantize


def _int8_sessions(models: dict, scratch: Path) -> dict:
    """Each model's ONNX export in ``scratch`` (:func:`_onnx_sessions`) quantized to int8, as a session."""
    from kprune_cli.deploy.quantization import int8_sessions

    return int8_sessions({role: scratch / f"{role}.onnx" for role in models})


def _onnx_sessions(models: dict, scratch: Path) -> dict:
    """Each model exported to ONNX in ``scratch`` and opened as an ONNX Runtime CPU session."""
    from kprune_cli.deploy.onnx_model import export_onnx, ort_session

    sessions = {}
    for role, model in models.items():
        device = next(model.parameters()).device
        export_onnx(model, scratch / f"{role}.onnx")  # on the CPU, in float32
        model.to(device)
        sessions[role] = ort_session(scratch / f"{role}.onnx")
    return sessions


def _onnx_figures(models: dict, sessions: dict, int8: dict, batch_size: int, seq_len: int, repeats: int) -> dict:
    """The row's ONNX Runtime figures per role (the inputs PyTorch is timed on), with the speedup; with
    ``int8`` sessions (timed in the same turns) theirs too, the speedup being over the float32 dense model."""
    from kprune_cli.deploy.onnx_model import example_inputs, interleaved_session_times

    inputs = example_inputs(models["checkpoint"], batch_size, seq_len, ragged=False)
    times = interleaved_session_times([*sessions.values(), *int8.values()], inputs, repeats)
    timed = iter(latency_figures(kept, batch_size, seq_len, "cpu") for kept in times)
    figures = {role: next(timed) for role in sessions}
    row: dict[str, Any] = {ORT_KEY: figures}
    if "dense" in figures:
        row[f"{ORT_KEY}_speedup"] = figures["dense"]["median_ms"] / figures["checkpoint"]["median_ms"]
    if int8:
        row[ORT_INT8_KEY] = quantized = {role: next(timed) for role in int8}
        if "dense" in figures:
            row[f"{ORT_INT8_KEY}_speedup"] = figures["dense"]["median_ms"] / quantized["checkpoint"]["median_ms"]
    return row


def _row(batch_size: int, seq_len: int, figures: dict[str, dict], flops: dict[str, float]) -> dict:
    """One batch size's figures per model role, with the speedup over the dense model where timed."""
    row = {"batch_size": batch_size, "seq_len": seq_len, **figures}
    if "dense" in figures:
        row["speedup"] = figures["dense"]["median_ms"] / figures["checkpoint"]["median_ms"]
        row["flops_ratio"] = flops["dense"] / flops["checkpoint"]
    return row


def _print_table(rows: list[dict]) -> None:
    table = Table(title="kprune bench (median ms per batch)")
    with_onnx, with_int8 = ORT_KEY in rows[0], ORT_INT8_KEY in rows[0]
    columns = ["batch", "seq", "checkpoint", "dense", "speedup"]
    if with_onnx:
        columns += ["ORT checkpoint", "ORT dense", "ORT speedup"]
    if with_int8:
        columns += ["ORT int8", "int8 speedup"]
    for column in [*columns, "FLOPs ratio"]:
        table.add_column(column, justify="right")
    for row in rows:
        dense = row.get("dense")
        cells = [str(row["batch_size"]), str(row["seq_len"]), f"{row['checkpoint']['median_ms']:.2f}",
                 f"{dense['median_ms']:.2f}" if dense else "-", f"{row['speedup']:.2f}x" if dense else "-"]
        if with_onnx:
            ort = row[ORT_KEY]
            cells += [f"{ort['checkpoint']['median_ms']:.2f}", f"{ort['dense']['median_ms']:.2f}" if dense else "-",
                      f"{row[ORT_KEY + '_speedup']:.2f}x" if dense else "-"]
        if with_int8:
            cells += [f"{row[ORT_INT8_KEY]['checkpoint']['median_ms']:.2f}",
                      f"{row[ORT_INT8_KEY + '_speedup']:.2f}x" if dense else "-"]
        table.add_row(*cells, f"{row['flops_ratio']:.2f}x" if dense else "-")
    console.print(table)
