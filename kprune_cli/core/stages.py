"""The stages of a pruning job that ``kprune run`` (:mod:`kprune_cli.cli.run`) and the Python API
(:mod:`kprune_cli.core.api`) share: build the pruner from its config, draw the calibration sample,
the FLOPs model, prune and slice. Each takes plain objects and returns plain objects; the notes
for the report are appended to a list the caller keeps.
"""

from __future__ import annotations

import importlib

from datasets import Dataset
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from kprune_cli.config.settings import SampleSize
from kprune_cli.config.values import check_argument_types
from kprune_cli.core.evaluation import measure_avg_seq_len
from kprune_cli.core.safeguards import NonFiniteWeights, non_finite_tensors, prune_with_memory_retry
from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.flops import FlopsModel
from kprune_cli.models.slicing import prune_physically
from kprune_cli.pruners.base import PruneProblem, Pruner, PruneResult
from kprune_cli.runtime.errors import UserError, listed
from kprune_cli.tasks.calibration import CalibrationSample, draw_calibration_examples, draw_calibration_sample
from kprune_cli.tasks.spec import TaskSpec


def build_pruner(cfg: DictConfig, name: str) -> Pruner:
    """The pruner of the ``pruner`` config group; a :class:`UserError` for a value of the wrong type
    (per the constructor's annotations) or one the constructor rejects."""
    module, _, attribute = str(cfg._target_).rpartition(".")
    try:
        target = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise UserError(f"pruner={name}: _target_={cfg._target_!r} cannot be imported ({error})") from None
    values = {key: value for key, value in OmegaConf.to_container(cfg, resolve=True).items()
              if not key.startswith("_")}
    check_argument_types(target, values, "pruner.")
    try:
        return instantiate(cfg)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"pruner={name}: its config does not fit {cfg._target_} ({cause or error})") from None


def draw_sample(task: TaskSpec, rows: Dataset, tokenizer: PreTrainedTokenizerBase, size: SampleSize,
                seed: int, batch_size: int) -> tuple[CalibrationSample, list[str]]:
    """The calibration sample of ``size`` drawn from ``rows``, and a note for the report when they hold less."""
    if size.unit == "examples":
        sample = draw_calibration_examples(task, rows, tokenizer, size.count, seed, batch_size)
        drawn = sample.num_examples
    else:
        sample = draw_calibration_sample(task, rows, tokenizer, size.count, seed, batch_size)
        drawn = sample.num_tokens
    if drawn >= size.count:
        return sample, []
    return sample, [f"{size} is more than the train split holds: the calibration sample is the whole split, "
                    f"{sample.num_tokens} tokens in {sample.num_examples} examples"]


def flops_model(task: TaskSpec, adapter: ModelAdapter, tokenizer: PreTrainedTokenizerBase,
                rows: Dataset) -> FlopsModel:
    """The FLOPs model at the task's average sequence length (docs/design.md §4), measured on ``rows``
    (the dev split) for a task that has none."""
    seq_len = task.avg_seq_len
    if seq_len is None:
        seq_len = measure_avg_seq_len(task, rows, tokenizer)
    return adapter.flops(seq_len)


def prune_and_slice(pruner: Pruner, problem: PruneProblem, notes: list[str]) -> PruneResult:
    """Run ``pruner`` on ``problem`` (retried with smaller micro-batches on a GPU out-of-memory error)
    and remove the pruned units from ``problem.model`` for good; the pruner's notes are appended to
    ``notes``. :class:`~kprune_cli.core.safeguards.NonFiniteWeights` if the pruned model holds NaN or ±inf."""
    result = prune_with_memory_retry(pruner, problem, notes)
    notes += result.notes
    prune_physically(problem.adapter, result.masks)
    if broken := non_finite_tensors(problem.model):
        raise NonFiniteWeights(f"pruning left NaN or infinite values in {listed(broken)}; nothing was saved"
                               + (f" (pruner notes: {'; '.join(result.notes)})" if result.notes else ""))
    return result
