"""Extractive question answering (SQuAD v1.1 / v2.0): start and end logits per token."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from datasets import Dataset, concatenate_datasets
from transformers import AutoModelForQuestionAnswering, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from kprune_cli.tasks.kinds.base import SQUAD_GRADIENT_BATCH, Predict, TaskKind
from kprune_cli.tasks.metrics import squad_scores
from kprune_cli.tasks.spec import TaskSpec
from kprune_cli.tasks.squad import (
    DOC_STRIDE,
    postprocess_predictions,
    read_squad_json,
    split_squad_by_article,
    tokenize_squad,
)

QA_COLUMNS = ("id", "context", "question", "answers")


class SquadFiles:
    """The SQuAD file layout, for a kind whose data are SQuAD files: the official ``<split>-v1.1.json``
    found first, SQuAD JSON read flat (HF ``squad`` columns), and one file alone split by article."""

    splits_single_file: ClassVar[bool] = True

    def official_files(self, task: TaskSpec, root: Path, split: str) -> list[Path]:
        """The official ``<split>-v1.1.json`` (``-v2.0`` for SQuAD v2.0)."""
        version = "2.0" if task.extra.get("version_2_with_negative") else "1.1"
        official = root / f"{split}-v{version}.json"
        return [official] if official.is_file() else []

    def read_json(self, paths: Sequence[Path]) -> Dataset:
        return concatenate_datasets([read_squad_json(path) for path in paths])

    def split_single_file(self, task: TaskSpec, whole: Dataset, first_articles: int | None, source: str
                          ) -> tuple[dict[str, Dataset], str]:
        """Articles ``[0, first_articles)`` (default: the first half) train, the rest evaluation."""
        num_articles = len(set(whole["title"])) if "title" in whole.column_names else 0
        first = first_articles if first_articles is not None else num_articles // 2
        halves = split_squad_by_article(whole, first)
        note = (f"no SQuAD train split given: {source} was split by article; articles 0-{first - 1} "
                f"({len(halves['train'])} questions) form the train split, articles {first}-{num_articles - 1} "
                f"({len(halves['validation'])} questions) the evaluation split")
        return {task.train_split: halves["train"], task.eval_splits[0]: halves["validation"]}, note


class QuestionAnswering(SquadFiles, TaskKind):
    """Answer spans from ``start_logits`` / ``end_logits`` ``(batch, seq)``; distilled by the mean of the
    start- and end-position KLs over real tokens."""

    name: ClassVar[str] = "qa"
    auto_class: ClassVar[type] = AutoModelForQuestionAnswering
    head_suffix: ClassVar[str] = "ForQuestionAnswering"
    pipeline_tag: ClassVar[str] = "question-answering"
    gradient_batch: ClassVar[int] = SQUAD_GRADIENT_BATCH
    token_outputs: ClassVar[tuple[str, ...]] = ("start_logits", "end_logits")
    prediction_reads_first_token: ClassVar[bool] = False

    def target_columns(self, task: TaskSpec) -> tuple[str, ...]:
        return ("answers",)

    def required_columns(self, task: TaskSpec, split: str) -> tuple[str, ...]:
        return (*task.text_keys, *QA_COLUMNS)

    def unlabeled_rows(self, rows: list[dict[str, str]]) -> list[dict[str, str]]:
        """Each row gets an ``id``, which groups a question's windows."""
        return [{**row, "id": str(index)} for index, row in enumerate(rows)]

    def tokenize(self, task: TaskSpec, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 for_training: bool) -> Dataset:
        return tokenize_squad(dataset, tokenizer, max_length, for_training=for_training,
                              doc_stride=task.extra.get("doc_stride", DOC_STRIDE))

    def soft_target(self, outputs: ModelOutput, temperature: float, token_mask: torch.Tensor) -> torch.Tensor:
        """Start/end log-probabilities at temperature ``T`` over real tokens: ``(batch, 2, seq)``."""
        return self._log_probs(outputs, temperature, token_mask).detach()

    def distillation_loss(self, outputs: ModelOutput, target: torch.Tensor, temperature: float,
                          token_mask: torch.Tensor) -> torch.Tensor:
        student = self._log_probs(outputs, temperature, token_mask)
        terms = target.exp() * (target - student)
        terms = torch.where(token_mask[:, None, :], terms, torch.zeros_like(terms))  # (batch, 2, seq)
        return temperature ** 2 * terms.sum(dim=-1).mean(dim=-1)

    @staticmethod
    def _log_probs(outputs: ModelOutput, temperature: float, token_mask: torch.Tensor) -> torch.Tensor:
        logits = torch.stack((outputs.start_logits, outputs.end_logits), dim=1) / temperature  # (batch, 2, seq)
        logits = logits.masked_fill(~token_mask[:, None, :], torch.finfo(logits.dtype).min)
        return F.log_softmax(logits, dim=-1)

    def evaluate(self, task: TaskSpec, dataset: Dataset, features: Dataset, predict: Predict) -> dict[str, float]:
        outputs = predict(self.token_outputs)
        answers = postprocess_predictions(dataset, features, outputs["start_logits"], outputs["end_logits"],
                                          version_2=task.extra.get("version_2_with_negative", False))
        predictions = [answers[example_id] for example_id in dataset["id"]]
        references = [answer["text"] for answer in dataset["answers"]]
        return self.metrics(task, predictions, references)

    def metrics(self, task: TaskSpec, predictions: Sequence, references: Sequence) -> dict[str, float]:
        """``predictions`` answer texts, ``references`` lists of gold answer texts (empty for an
        unanswerable SQuAD v2.0 question)."""
        scores = squad_scores(predictions, references, version_2=task.extra.get("version_2_with_negative", False))
        return {name: scores[name] for name in task.metrics if name in scores}  # v2.0 splits may be empty
