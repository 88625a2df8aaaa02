"""The protocol of a task kind: everything the pipeline does differently for one kind of task.

A :class:`~kprune_cli.tasks.spec.TaskSpec` names its kind (``task.kind``); the pipeline asks the
kind's :class:`TaskKind` object (:func:`kprune_cli.tasks.kinds.kind_of`) instead of branching on it:
which stock ``transformers`` Auto class builds the model and which checkpoints fit, how rows become
features, the teacher's soft target and the distillation loss, the official gradient batch, which
tokens a prediction reads, the evaluation and its metrics. Adding a kind is one module of this
package plus its entry in :data:`kprune_cli.tasks.kinds.KINDS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from datasets import Dataset
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.spec import TaskSpec

GLUE_GRADIENT_BATCH = 32
"""Sequences per gradient batch of the official codes on GLUE (:mod:`kprune_cli.pruners.common.gradient_batch`)."""
SQUAD_GRADIENT_BATCH = 12
"""Sequences per gradient batch of the official codes on SQuAD."""

Predict = Callable[[tuple[str, ...]], dict[str, list[np.ndarray]]]
"""Runs the model on the split's features and returns the named outputs, one array per feature in
feature order (see :func:`kprune_cli.core.evaluation.predict`)."""


class TaskKind(ABC):
    """One kind of task (classification, regression, extractive QA, sentence embedding).

    Class attributes:

    - ``name``: the kind's name, as ``TaskSpec.kind`` spells it;
    - ``auto_class``: the stock ``transformers`` Auto class of the model (with its task head);
    - ``head_suffix``: how the class name of a fitting checkpoint ends (``"ForQuestionAnswering"``);
    - ``pipeline_tag``: the Hugging Face hub's pipeline tag of such a model (its model card says it);
    - ``gradient_batch``: the official codes' sequences per squared gradient;
    - ``token_outputs``: model outputs with one value per token (padding is cut off in evaluation);
    - ``prediction_reads_first_token``: whether the head reads the first ([CLS]) token only, so that
      Kwon et al.'s mask tuning reconstructs the last FFN on that token alone;
    - ``labelled``: whether the task's loss needs gold targets (a pruner that needs labels refuses
      a kind without);
    - ``splits_single_file``: whether one data file given alone is split into train and evaluation
      splits (:meth:`split_single_file`).
    """

    name: ClassVar[str]
    auto_class: ClassVar[type]
    head_suffix: ClassVar[str]
    pipeline_tag: ClassVar[str]
    gradient_batch: ClassVar[int]
    token_outputs: ClassVar[tuple[str, ...]] = ()
    prediction_reads_first_token: ClassVar[bool]
    labelled: ClassVar[bool] = True
    splits_single_file: ClassVar[bool] = False

    # -- data ------------------------------------------------------------------------------------
    @abstractmethod
    def target_columns(self, task: TaskSpec) -> tuple[str, ...]:
        """The columns of a split that hold the gold targets (none for an unlabeled kind)."""

    def required_columns(self, task: TaskSpec, split: str) -> tuple[str, ...]:
        """The columns split ``split`` must have."""
        return (*task.text_keys, *self.target_columns(task))

    def unlabeled_keys(self, task: TaskSpec) -> tuple[str, ...]:
        """The text columns one line of an unlabeled calibration file fills (see :mod:`kprune_cli.tasks.unlabeled`)."""
        return task.text_keys

    def unlabeled_rows(self, rows: list[dict[str, str]]) -> list[dict[str, str]]:
        """The rows read from an unlabeled file, completed with what the kind's features need."""
        return rows

    def official_files(self, task: TaskSpec, root: Path, split: str) -> list[Path]:
        """Files of split ``split`` under ``root`` in a layout of the kind's own (before the generic ones)."""
        return []

    def read_json(self, paths: Sequence[Path]) -> Dataset | None:
        """``paths`` (``.json`` files) read in the kind's own format, or None for the generic JSON reader."""
        return None

    def split_single_file(self, task: TaskSpec, whole: Dataset, first_articles: int | None, source: str
                          ) -> tuple[dict[str, Dataset], str]:
        """Train and evaluation splits made from ``whole``, the one file ``source`` given, and a note
        for the report (only for a kind that ``splits_single_file``)."""
        raise NotImplementedError(f"task kind {self.name} does not split a single file")

    @abstractmethod
    def tokenize(self, task: TaskSpec, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 for_training: bool) -> Dataset:
        """Unpadded model features of ``dataset``; rows of one example that give several features carry
        the same ``example_id``, consecutively."""

    def evaluation_features(self, task: TaskSpec, dataset: Dataset, tokenizer: PreTrainedTokenizerBase,
                            max_length: int) -> Dataset:
        """The features :meth:`evaluate` reads for an evaluation split (by default :meth:`tokenize`'s, without
        training targets)."""
        return self.tokenize(task, dataset, tokenizer, max_length, for_training=False)

    # -- model -----------------------------------------------------------------------------------
    def check_head(self, config: PretrainedConfig, task: TaskSpec, path: str) -> None:
        """A :class:`UserError` unless the checkpoint's head fits ``task``."""
        architectures = config.architectures or []
        if not any(name.endswith(self.head_suffix) for name in architectures):
            found = ", ".join(architectures) or "no recorded architecture"
            raise UserError(f"model {path!r} is a {found} checkpoint but task {task.name!r} needs a "
                            f"...{self.head_suffix} one: pass a model fine-tuned on this task, or fine-tune one first "
                            "(kprune finetune)")

    def configure_head(self, config: PretrainedConfig, task: TaskSpec) -> None:
        """Set ``config`` up for a fresh (or resized) head for fine-tuning on ``task``."""
        config.num_labels = task.num_labels  # keeps the label names when the count already fits

    def prepare_model(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, location: str) -> None:
        """Anything the kind adds to a model and its tokenizer just loaded from ``location`` (nothing by default)."""

    def write_companions(self, model: PreTrainedModel, directory: Path, max_length: int) -> None:
        """Files a saved checkpoint of ``model`` needs beside the weights (none by default)."""

    # -- distillation ----------------------------------------------------------------------------
    @abstractmethod
    def soft_target(self, outputs: ModelOutput, temperature: float, token_mask: torch.Tensor) -> torch.Tensor:
        """The teacher's soft target of one batch, detached; ``token_mask`` ``(batch, seq)`` bool."""

    @abstractmethod
    def distillation_loss(self, outputs: ModelOutput, target: torch.Tensor, temperature: float,
                          token_mask: torch.Tensor) -> torch.Tensor:
        """Per-sample distillation loss ``(batch,)`` of the student's ``outputs`` against ``target``;
        the loss of sample ``b`` depends on sample ``b`` alone (K-prune's per-sample gradients)."""

    # -- evaluation ------------------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, task: TaskSpec, dataset: Dataset, features: Dataset, predict: Predict) -> dict[str, float]:
        """Every metric of ``task`` on one evaluation split (its rows, and their :meth:`evaluation_features`)."""

    @abstractmethod
    def metrics(self, task: TaskSpec, predictions: Sequence, references: Sequence) -> dict[str, float]:
        """Every metric of ``task.metrics`` from predictions and references, as fractions."""
