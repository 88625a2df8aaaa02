"""``kprune eval``: the task metrics of one checkpoint (dense or pruned) on the dev split(s)."""

from __future__ import annotations

import json
import time

from omegaconf import DictConfig
from rich.markup import escape
from rich.table import Table

from kprune_cli.config.values import check_int, check_optional_int, check_precision, resolve_config
from kprune_cli.core.builtins import resolve_data_dir, resolve_model_path
from kprune_cli.core.evaluation import capped_evaluation_note, evaluate_model
from kprune_cli.models.loading import count_parameters, load_model
from kprune_cli.runtime.console import console, warn
from kprune_cli.runtime.device import resolve_device
from kprune_cli.runtime.hardware import announce_device, emulated_note
from kprune_cli.runtime.precision import PRECISIONS
from kprune_cli.tasks.data import load_task_data
from kprune_cli.tasks.spec import get_task


def run_eval(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.checkpoint`` on ``cfg.task``; print a table and one JSON line on stdout."""
    resolve_config(cfg)
    batch_size = check_int("eval_batch_size", cfg.eval_batch_size, 1)
    max_examples = check_optional_int("eval_max_examples", cfg.eval_max_examples, 1)
    precision = check_precision("eval_dtype", cfg.eval_dtype)
    task = get_task(str(cfg.task.name))
    device = resolve_device(str(cfg.device))
    announce_device(device)
    for note in emulated_note(f"eval_dtype={precision}", PRECISIONS[precision], device, "the forward passes",
                              "eval_dtype=fp32"):
        warn(note)
    checkpoint, _ = resolve_model_path(str(cfg.checkpoint), task, device)
    data = load_task_data(task, resolve_data_dir(task, cfg.data_dir), splits=task.eval_splits)
    model, tokenizer = load_model(checkpoint, task, device)
    start = time.perf_counter()
    metrics = evaluate_model(model, tokenizer, task, data, device, batch_size=batch_size, max_examples=max_examples,
                             dtype=PRECISIONS[precision])
    seconds = time.perf_counter() - start
    for note in capped_evaluation_note(task, data, max_examples):
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)

    table = Table(title=f"{task.name} · {checkpoint}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    console.print(f"{count_parameters(model):,} parameters · evaluated in {seconds:.1f}s on {device}", highlight=False)
    print(json.dumps({"task": task.name, "checkpoint": checkpoint, "metrics": metrics, "eval_dtype": precision,
                      "seconds": round(seconds, 3)}))
    return metrics
