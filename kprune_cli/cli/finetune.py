"""``kprune finetune``, the command: read the config, resolve the model and data, fine-tune, save.

The training itself is :mod:`kprune_cli.core.finetune`; this module adds what only the command needs
(built-in model names, the output directory, the summary table), so that training code does not
depend on :mod:`kprune_cli.core.builtins` (whose built-in demo model is made with that training code).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.table import Table

from kprune_cli.config.values import check_bool, check_optional_int, required_keys, resolve_config
from kprune_cli.core.builtins import resolve_data_dir, resolve_model_path
from kprune_cli.core.finetune import FinetuneRecipe, finetune, load_seeded, read_recipe, write_finetuned
from kprune_cli.runtime.console import console, make_progress, warn
from kprune_cli.runtime.device import resolve_device
from kprune_cli.runtime.hardware import announce_device, emulated_note
from kprune_cli.runtime.output_dir import atomic_directory, check_output_dir
from kprune_cli.runtime.precision import PRECISIONS
from kprune_cli.tasks.data import load_task_data
from kprune_cli.tasks.spec import TaskSpec, get_task


@dataclass(frozen=True)
class FinetuneSettings:
    """The plain, checked values of a ``kprune finetune`` config: what to train, where, and how."""

    task: TaskSpec  # with the config's max_length, if it sets one
    model_path: str
    data_dir: str | None
    device: torch.device
    output_dir: Path
    overwrite: bool
    recipe: FinetuneRecipe


def read_settings(cfg: DictConfig) -> FinetuneSettings:
    """The values of ``cfg`` (configs/finetune.yaml as Hydra composed it) that ``kprune finetune``
    uses; a :class:`UserError` names the first bad one."""
    resolve_config(cfg)
    with required_keys():
        task = get_task(str(cfg.task.name))
        max_length = check_optional_int("max_length", cfg.max_length, 1)
        if max_length is not None:
            task = dataclasses.replace(task, max_length=max_length)
        return FinetuneSettings(
            task=task,
            model_path=str(cfg.model.path),
            data_dir=None if cfg.data_dir is None else str(cfg.data_dir),
            device=resolve_device(str(cfg.device)),
            output_dir=Path(str(cfg.output_dir)),
            overwrite=check_bool("overwrite", cfg.overwrite),
            recipe=read_recipe(cfg),
        )


def run_finetune(cfg: DictConfig) -> Path:
    """Run ``kprune finetune`` as described by ``cfg`` (configs/finetune.yaml); return the output dir."""
    settings = read_settings(cfg)
    task, device, recipe = settings.task, settings.device, settings.recipe
    check_output_dir(settings.output_dir, settings.overwrite)  # before the minutes of training, not after
    announce_device(device)
    for note in emulated_note(f"dtype={recipe.dtype}", PRECISIONS[recipe.dtype], device, "the training passes",
                              "dtype=fp32"):
        warn(note)

    model_path, _ = resolve_model_path(settings.model_path, task, device)
    datasets = load_task_data(task, data_dir=resolve_data_dir(task, settings.data_dir))
    model, tokenizer = load_seeded(model_path, task, device, recipe.seed)
    start = time.perf_counter()
    with make_progress() as progress:
        metrics = finetune(model, tokenizer, task, datasets, recipe, device=device, progress=progress)
    seconds = time.perf_counter() - start
    with atomic_directory(settings.output_dir, overwrite=settings.overwrite) as staging:
        write_finetuned(model, tokenizer, metrics, staging)
    _print_summary(task, model_path, metrics, seconds, settings.output_dir)
    return settings.output_dir


def _print_summary(task: TaskSpec, model_path: str, metrics: dict[str, float], seconds: float,
                   output_dir: Path) -> None:
    table = Table(title=f"fine-tuned on {task.name}", show_header=False, title_justify="left")
    table.add_row("model", model_path)
    table.add_row("time", f"{seconds:.1f} s")
    for name, value in metrics.items():
        table.add_row(f"dev {name}", f"{value:.4f}")
    table.add_row("saved to", str(output_dir))
    console.print(table)
