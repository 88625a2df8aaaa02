"""Fine-tuning: make a dense fine-tuned baseline from a pretrained encoder and a task (the training
behind ``kprune finetune``, whose command is :mod:`kprune_cli.cli.finetune`).

Standard recipe: AdamW (no decay on biases and LayerNorm weights), linear schedule with warm-up,
gradient clipping at 1.0, shuffled batches from a seeded generator, dynamic padding. The loss is the
model's own (``labels`` for GLUE, ``start_positions`` / ``end_positions`` for SQuAD). An optimizer
step may accumulate the gradients of several forward passes (``gradient_accumulation_steps``), so that
a large batch fits a small GPU. ``dtype=bf16`` / ``fp16`` runs the forward (and so the backward)
passes under autocast, the weights and the optimizer staying float32; fp16 scales the loss (a
``torch.amp.GradScaler``: gradients unscaled before clipping, steps with an overflow skipped). On a
GPU the batches are copied from pinned memory. The result is a normal Hugging Face directory with
``dev_metrics.json`` beside the weights (evaluated in float32).
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from datasets import DatasetDict
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from kprune_cli.config.paths import CONFIG_DIR
from kprune_cli.config.values import (
    SEED_LIMIT,
    check_float,
    check_int,
    check_optional_int,
    check_precision,
    required_keys,
)
from kprune_cli.models.loading import load_for_finetuning
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.precision import PRECISIONS
from kprune_cli.tasks.spec import TaskSpec

MAX_GRAD_NORM = 1.0
LOSS_SMOOTHING = 0.98  # weight of the past in the running loss shown on the progress bar
# The running loss stays on the device and is read (a host sync on a GPU) only every this many steps
# and at the last one, so that the host can queue the next steps' kernels meanwhile.
LOSS_READ_EVERY = 25
METRICS_FILE = "dev_metrics.json"
CONFIG_NAME = "finetune.yaml"


@dataclass(frozen=True)
class FinetuneRecipe:
    """The checked training hyper-parameters of a ``kprune finetune`` config (configs/finetune.yaml)."""

    epochs: float
    learning_rate: float
    batch_size: int
    warmup_ratio: float
    weight_decay: float
    max_steps: int | None
    seed: int
    gradient_accumulation_steps: int = 1  # forward passes of ``batch_size`` sequences per optimizer step
    dtype: str = "fp32"  # fp32 | bf16 | fp16: the training passes' precision (autocast)


def read_recipe(cfg: DictConfig) -> FinetuneRecipe:
    """The training hyper-parameters of ``cfg``; a :class:`UserError` names the first bad one."""
    with required_keys():
        return FinetuneRecipe(
            epochs=check_float("epochs", cfg.epochs, 0, above_minimum=True),
            learning_rate=check_float("learning_rate", cfg.learning_rate, 0, above_minimum=True),
            batch_size=check_int("batch_size", cfg.batch_size, 1),
            warmup_ratio=check_float("warmup_ratio", cfg.warmup_ratio, 0, 1),
            weight_decay=check_float("weight_decay", cfg.weight_decay, 0),
            max_steps=check_optional_int("max_steps", cfg.max_steps, 1),
            seed=check_int("seed", cfg.seed, 0, SEED_LIMIT),
            gradient_accumulation_steps=check_int("gradient_accumulation_steps", cfg.gradient_accumulation_steps, 1),
            dtype=check_precision("dtype", cfg.dtype),
        )


def default_recipe() -> FinetuneRecipe:
    """The recipe of configs/finetune.yaml as written, without command-line overrides."""
    return read_recipe(OmegaConf.load(CONFIG_DIR / CONFIG_NAME))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and LayerNorm weights (1-D) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _training_batches(loader: DataLoader, num_steps: int, per_step: int
                      ) -> Iterator[list[dict[str, torch.Tensor]]]:
    """``num_steps`` groups of ``per_step`` batches (one group per optimizer step), starting a new
    (reshuffled) epoch whenever ``loader`` runs out."""
    group: list[dict[str, torch.Tensor]] = []
    step = 0
    while step < num_steps:
        for batch in loader:
            group.append(batch)
            if len(group) == per_step:
                yield group
                group, step = [], step + 1
                if step == num_steps:
                    return


def _accumulate(model: PreTrainedModel, group: list[dict[str, torch.Tensor]], dtype: torch.dtype | None,
                scaler: torch.amp.GradScaler) -> torch.Tensor:
    """Backward of the mean loss over the batches of ``group`` (each batch's own mean loss, weighted
    by its sequences: the loss of the whole group as one batch), the forward under autocast in
    ``dtype`` (None: float32) and the loss multiplied by ``scaler``'s scale; the loss, detached
    and unscaled."""
    total = sum(int(next(iter(batch.values())).shape[0]) for batch in group)
    summed = torch.zeros((), device=model.device)
    precision = torch.autocast(model.device.type, dtype=dtype) if dtype is not None else nullcontext()
    for batch in group:
        size = int(next(iter(batch.values())).shape[0])
        with precision:
            loss = model(**{k: v.to(model.device, non_blocking=True) for k, v in batch.items()}).loss * (size / total)
        scaler.scale(loss).backward()
        summed += loss.detach().float()
    return summed


def _out_of_memory(recipe: FinetuneRecipe) -> UserError:
    """The one-line error for a training step that does not fit the GPU."""
    passes = recipe.gradient_accumulation_steps
    effective = recipe.batch_size * passes
    return UserError(f"fine-tuning ran out of GPU memory with batch_size={recipe.batch_size} "
                     f"(x gradient_accumulation_steps={passes}): lower batch_size and raise "
                     f"gradient_accumulation_steps to keep {effective} sequences per step (e.g. "
                     f"batch_size={max(1, recipe.batch_size // 2)} gradient_accumulation_steps={2 * passes})")


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    datasets: DatasetDict,
    recipe: FinetuneRecipe,
    *,
    device: torch.device | str,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Fine-tune ``model`` in place on ``task``'s train split; return its metrics on the dev split(s).

    ``recipe.max_steps`` (if set) replaces ``recipe.epochs`` as the number of optimizer steps; each
    step takes ``recipe.gradient_accumulation_steps`` batches of ``recipe.batch_size``. A step that
    runs out of GPU memory is a :class:`UserError` naming both. The
    shuffling order and dropout draw from ``recipe.seed`` only (the global RNG state is restored
    afterwards), so on CPU the same seed gives the same weights. The model is left in eval mode.
    """
    from kprune_cli.core.evaluation import evaluate_model
    from kprune_cli.tasks.batches import FeatureBatches
    from kprune_cli.tasks.data import tokenize_split

    train = tokenize_split(task, datasets[task.train_split], tokenizer, for_training=True)
    if len(train) == 0:
        raise UserError(f"the {task.train_split!r} split of task {task.name!r} has no examples to fine-tune on")
    generator = torch.Generator().manual_seed(recipe.seed)
    on_gpu = torch.device(device).type == "cuda"
    # Shuffled row indices, padded into batches from the Arrow columns (the same draws as a loader
    # over the rows themselves, without building Python lists per row).
    loader = DataLoader(range(len(train)), batch_size=recipe.batch_size, shuffle=True, generator=generator,
                        collate_fn=FeatureBatches(train, tokenizer).batch, pin_memory=on_gpu)
    dtype = PRECISIONS[recipe.dtype]
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=dtype == torch.float16)
    per_step = recipe.gradient_accumulation_steps
    num_steps = recipe.max_steps or math.ceil(recipe.epochs * len(loader) / per_step)

    model.to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(recipe.warmup_ratio * num_steps), num_steps)
    bar = progress.add_task(f"fine-tuning on {task.name}", total=num_steps) if progress is not None else None

    cuda_devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(recipe.seed)
        model.train()
        running_loss: torch.Tensor | None = None  # () float32, on the device
        for step, group in enumerate(_training_batches(loader, num_steps, per_step), start=1):
            try:
                loss = _accumulate(model, group, dtype, scaler)
            except torch.cuda.OutOfMemoryError:
                raise _out_of_memory(recipe) from None
            scaler.unscale_(optimizer)  # (no-ops unless fp16)
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running_loss = loss if running_loss is None else running_loss.lerp_(loss, 1 - LOSS_SMOOTHING)
            if progress is None:
                continue
            if step % LOSS_READ_EVERY == 0 or step == num_steps:
                progress.update(bar, completed=step,
                                description=f"fine-tuning on {task.name} (loss {running_loss.item():.4f})")
            else:
                progress.update(bar, completed=step)
        model.eval()
    return evaluate_model(model, tokenizer, task, datasets, device, progress=progress)


def load_seeded(path: str, task: TaskSpec, device: torch.device | str, seed: int
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`~kprune_cli.models.loading.load_for_finetuning`, its fresh task head drawn from ``seed``
    (the global RNG state is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_for_finetuning(path, task, device)


def write_finetuned(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, metrics: dict[str, float],
                    directory: Path) -> None:
    """Write model, tokenizer and ``dev_metrics.json`` into ``directory``."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
