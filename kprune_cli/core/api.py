"""The Python API: prune a model object in a few lines, with the stages ``kprune run`` uses.

    from kprune_cli import prune, save_pruned

    outcome = prune(model, tokenizer, task="mrpc", rate=0.5, calibration=train_rows)
    save_pruned(outcome, "pruned/")

``prune`` draws the calibration sample (from a ``datasets.Dataset`` with the task's columns, a list
of texts, or an unlabeled ``.txt`` / ``.jsonl`` file), runs the pruner, and removes the pruned units
from the model for good; ``kprune run`` adds loading, evaluation, output directories, resume and
the report files around the same stages (:mod:`kprune_cli.core.stages`). docs/python-api.md has a
runnable example.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kprune_cli.config.paths import CONFIG_DIR
from kprune_cli.config.settings import SampleSize
from kprune_cli.config.values import SEED_LIMIT, check_int, check_rate
from kprune_cli.core.report import pruning_figures, versions
from kprune_cli.core.safeguards import non_finite_tensors
from kprune_cli.core.stages import build_pruner, draw_sample, flops_model, prune_and_slice
from kprune_cli.models import checkpoint
from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.loading import count_parameters
from kprune_cli.models.masks import Masks
from kprune_cli.pruners.base import PruneProblem, Pruner
from kprune_cli.runtime.device import resolve_device
from kprune_cli.runtime.errors import UserError, listed
from kprune_cli.runtime.timing import timed
from kprune_cli.tasks.calibration import has_targets
from kprune_cli.tasks.kinds import kind_of
from kprune_cli.tasks.spec import TaskSpec, get_task
from kprune_cli.tasks.unlabeled import read_unlabeled, rows_from_texts

REPORT_NAME = "kprune_report.json"
"""What :func:`save_pruned` writes beside the checkpoint: the outcome's report."""


@dataclass
class PruneOutcome:
    """What :func:`prune` gives back.

    ``model``: the model given, pruned in place (physically smaller, float32, eval mode, on the
    device it was pruned on); ``tokenizer``: the one given; ``masks``: the keep-masks the pruner
    chose, one ``(H,)`` per layer's heads and one ``(N,)`` per layer's FFN neurons (0 removed the
    unit; other values were folded into the weights); ``report``: the pruning part of
    ``kprune run``'s report.json (task, pruner, rate, seed, device, flops, params, layers,
    dense_layers, sample, pruner_settings, timing, notes, versions); ``dtype``: the dtype the model
    came in, in which :func:`save_pruned` stores it; ``task``: the task it was pruned for (its kind's
    files, e.g. a sentence-embedding model's pooling, are saved beside the weights).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    masks: Masks
    report: dict[str, Any]
    dtype: torch.dtype
    task: TaskSpec


def prune(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: str | TaskSpec = "mrpc",
          rate: float = 0.5, calibration: Dataset | Sequence[str] | str | Path | None = None,
          pruner: str | Pruner = "kprune", *, seed: int = 0, device: str = "auto", num_tokens: int | None = 100_000,
          num_examples: int | None = None, calibration_seed: int = 0, calibration_batch_size: int = 32) -> PruneOutcome:
    """Prune ``model`` (a fine-tuned encoder with the task's head) to remove ``rate`` of its FLOPs.

    ``task``: a task name (``kprune run task=...``: mrpc, sst2, stsb, squad, stsb_embed ...) or a
    :class:`~kprune_cli.tasks.spec.TaskSpec`. For a sentence-embedding task (``stsb_embed``,
    ``squad_retrieval``) ``model`` is a bare encoder (``AutoModel``) and its pooling is read as
    ``kprune run`` reads it, from the sentence-transformers files of the folder it was loaded from
    (``model.name_or_path``; mean pooling without them, or for a hub id), unless one was attached
    already (:func:`~kprune_cli.tasks.kinds.embedding.attach_pooling`); :func:`save_pruned` writes them
    beside the weights. ``calibration``: the rows the sample is drawn from:
    a ``datasets.Dataset`` with the task's columns (its train split; gold labels are read only by
    pruners that need them), a list of texts (one example each; a pair's two texts separated by a
    tab), or the path of an unlabeled ``.txt`` / ``.jsonl`` file. ``pruner``: the name of a
    ``configs/pruner`` file (kprune, kprune_no_tune, kwon, magnitude, random ...), built with its
    defaults, or a pruner object (``KPrunePruner(micro_batch_size=8)``). ``num_tokens`` /
    ``num_examples``: the sample's size (give one; Kwon et al.'s official sample is
    ``num_examples=2048``); ``calibration_seed`` / ``calibration_batch_size`` as
    ``calibration.seed`` / ``calibration.batch_size``; ``seed``: the run's seed (the random
    pruner's); ``device``: ``auto``, ``cpu`` or ``cuda``.

    The model is pruned in place, in float32 (as ``kprune run`` prunes); a mistake in the inputs is
    one :class:`~kprune_cli.runtime.errors.UserError`.
    """
    rate = check_rate(rate)
    seed = check_int("seed", seed, 0, SEED_LIMIT)
    size = _sample_size(num_tokens, num_examples)
    task = get_task(task) if isinstance(task, str) else task
    device = resolve_device(device)
    name, pruner = _pruner(pruner, seed)
    rows = _calibration_rows(task, calibration)
    if pruner.needs_labels and not has_targets(task, rows):
        raise UserError(f"pruner={name} needs labelled calibration data (it uses the task loss): pass a Dataset "
                        f"with the task's labels, or a pruner that needs none (kprune)")
    dtype = model.dtype
    kind_of(task).prepare_model(model, tokenizer, str(model.name_or_path))  # as load_model: an embedding's pooling
    model = model.to(device=device, dtype=torch.float32).eval()
    if broken := non_finite_tensors(model):
        raise UserError(f"the model has NaN or infinite values in {listed(broken)}: pass a model with finite weights")
    torch.manual_seed(seed)
    adapter = get_adapter(model)
    timing: dict[str, float] = {}
    with timed(timing, "calibration"):
        sample, notes = draw_sample(task, rows, tokenizer, size, calibration_seed, calibration_batch_size)
    flops = flops_model(task, adapter, tokenizer, rows)
    dense_structure, dense_params = adapter.structure(), count_parameters(model)
    problem = PruneProblem(model=model, adapter=adapter, task=task, sample=sample, flops=flops, rate=rate,
                           device=device, seed=seed)
    with timed(timing, "prune"):
        result = prune_and_slice(pruner, problem, notes)
    report = {
        "task": task.name, "pruner": name, "rate": rate, "seed": seed, "device": str(device),
        **pruning_figures(flops, dense_structure, adapter.structure(), (dense_params, count_parameters(model)),
                          sample, str(size)),
        "pruner_settings": dict(result.settings),
        "timing": {**{stage: round(seconds, 3) for stage, seconds in timing.items()},
                   **{f"prune.{stage}": round(seconds, 3) for stage, seconds in result.timing.items()}},
        "notes": list(notes),
        "versions": versions(),
    }
    return PruneOutcome(model=model, tokenizer=tokenizer, masks=result.masks, report=report, dtype=dtype, task=task)


def save_pruned(outcome: PruneOutcome, directory: str | Path) -> Path:
    """Write the pruned checkpoint (loadable by stock ``transformers`` with ``trust_remote_code=True``)
    and its report (:data:`REPORT_NAME`) to ``directory``, replacing it; returns the directory."""
    directory = Path(directory)
    checkpoint.save_pruned(outcome.model, outcome.tokenizer, directory, dtype=outcome.dtype, task=outcome.task)
    (directory / REPORT_NAME).write_text(json.dumps(outcome.report, indent=2) + "\n")
    return directory


def _sample_size(num_tokens: int | None, num_examples: int | None) -> SampleSize:
    """The one of ``num_tokens`` / ``num_examples`` given (``num_examples`` wins over the default tokens)."""
    if num_examples is not None:
        return SampleSize(check_int("num_examples", num_examples, 1), "examples")
    if num_tokens is None:
        raise UserError("num_tokens=None and num_examples=None: give the calibration sample's size")
    return SampleSize(check_int("num_tokens", num_tokens, 1), "tokens")


def _pruner(pruner: str | Pruner, seed: int) -> tuple[str, Pruner]:
    """A pruner object and its name: built from ``configs/pruner/<name>.yaml`` as ``kprune run`` builds it."""
    if not isinstance(pruner, str):
        return getattr(pruner, "name", type(pruner).__name__), pruner
    choices = sorted(path.stem for path in (CONFIG_DIR / "pruner").glob("*.yaml"))
    if pruner not in choices:
        raise UserError(f"pruner={pruner!r} is not a pruner: choose one of {', '.join(choices)}, "
                        f"or pass a pruner object")
    with initialize_config_dir(config_dir=str(CONFIG_DIR / "pruner"), version_base="1.3", job_name="kprune"):
        cfg = compose(pruner)
    root = OmegaConf.create({"seed": seed, "pruner": cfg})  # ``${seed}`` in a pruner's config is the run's seed
    return pruner, build_pruner(root.pruner, pruner)


def _calibration_rows(task: TaskSpec, calibration: Dataset | Sequence[str] | str | Path | None) -> Dataset:
    """The rows the calibration sample is drawn from (see :func:`prune`)."""
    if isinstance(calibration, Dataset):
        return calibration
    if isinstance(calibration, (str, Path)):
        return read_unlabeled(task, calibration)
    if isinstance(calibration, Sequence) and calibration and all(isinstance(text, str) for text in calibration):
        return rows_from_texts(task, calibration)
    raise UserError(f"calibration={type(calibration).__name__}: give a datasets.Dataset with the task's columns, "
                    f"a list of texts, or the path of a .txt or .jsonl file")
