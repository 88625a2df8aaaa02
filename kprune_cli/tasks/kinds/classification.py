"""Sequence classification (GLUE): one label per example, read from the [CLS] token's head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.glue import tokenize_glue
from kprune_cli.tasks.kinds.base import GLUE_GRADIENT_BATCH, Predict, TaskKind
from kprune_cli.tasks.metrics import label_metrics
from kprune_cli.tasks.spec import TaskSpec


class Classification(TaskKind):
    """Class ids from ``logits`` ``(batch, num_labels)``; distilled by ``T²·KL`` of tempered softmaxes."""

    name: ClassVar[str] = "classification"
    auto_class: ClassVar[type] = AutoModelForSequenceClassification
    head_suffix: ClassVar[str] = "ForSequenceClassification"
    pipeline_tag: ClassVar[str] = "text-classification"
    gradient_batch: ClassVar[int] = GLUE_GRADIENT_BATCH
    prediction_reads_first_token: ClassVar[bool] = True
    label_type: ClassVar[type] = int
    problem_type: ClassVar[str] = "single_label_classification"

    def target_columns(self, task: TaskSpec) -> tuple[str, ...]:
        return (task.label_key,)

    def tokenize(self, task: TaskSpec, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 for_training: bool) -> Dataset:
        return tokenize_glue(task, dataset, tokenizer, max_length, self.label_type)

    def check_head(self, config: PretrainedConfig, task: TaskSpec, path: str) -> None:
        super().check_head(config, task, path)
        if config.num_labels != task.num_labels:
            raise UserError(f"model {path!r} has {config.num_labels} output labels but task {task.name!r} needs "
                            f"{task.num_labels}: pass a model fine-tuned on {task.name}")

    def configure_head(self, config: PretrainedConfig, task: TaskSpec) -> None:
        super().configure_head(config, task)
        config.problem_type = self.problem_type

    def soft_target(self, outputs: ModelOutput, temperature: float, token_mask: torch.Tensor) -> torch.Tensor:
        """Log-probabilities at temperature ``T``: ``(batch, labels)``."""
        return self._log_probs(outputs, temperature).detach()

    def distillation_loss(self, outputs: ModelOutput, target: torch.Tensor, temperature: float,
                          token_mask: torch.Tensor) -> torch.Tensor:
        """``T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` ``(batch,)``."""
        student = self._log_probs(outputs, temperature)
        return temperature ** 2 * (target.exp() * (target - student)).sum(dim=-1)

    @staticmethod
    def _log_probs(outputs: ModelOutput, temperature: float) -> torch.Tensor:
        return F.log_softmax(outputs.logits / temperature, dim=-1)  # (batch, labels)

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        """``(examples,)`` predictions of ``logits`` ``(examples, num_labels)``: class ids."""
        return logits.argmax(axis=-1)

    def evaluate(self, task: TaskSpec, dataset: Dataset, features: Dataset, predict: Predict) -> dict[str, float]:
        logits = np.stack(predict(("logits",))["logits"])  # (examples, num_labels)
        return self.metrics(task, self.predictions(logits), dataset[task.label_key])

    def metrics(self, task: TaskSpec, predictions: Sequence, references: Sequence) -> dict[str, float]:
        """``predictions`` class ids (or scores) and ``references`` labels, both ``(examples,)``."""
        return label_metrics(task, predictions, references)
