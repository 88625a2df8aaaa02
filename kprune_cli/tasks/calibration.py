"""The calibration sample: a fixed-seed draw from the train split (or from an unlabeled text file,
``calibration.source``), of ~num_tokens tokens (:func:`draw_calibration_sample`) or of num_examples
examples (:func:`draw_calibration_examples`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset, DatasetDict, concatenate_datasets
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.interrupts import deferred_interrupts
from kprune_cli.tasks.batches import FeatureBatches
from kprune_cli.tasks.data import MODEL_INPUT_KEYS, feature_lengths, tokenize_split
from kprune_cli.tasks.kinds import kind_of
from kprune_cli.tasks.spec import TaskSpec
from kprune_cli.tasks.unlabeled import read_unlabeled

logger = logging.getLogger(__name__)

# Rows tokenised first, to estimate the tokens per row before topping up.
FIRST_CHUNK_ROWS = 256


DRAW_INDEX = "draw_index"
"""Batch key of a ``(batch,)`` long tensor: each sequence's place in the order the sample was drawn."""


@dataclass
class CalibrationSample:
    """Tokenised batches, sorted by length to cut padding.

    Each batch maps ``input_ids`` / ``attention_mask`` (and ``token_type_ids`` where the
    model uses them) to ``(batch, seq)`` tensors, plus gold targets where the data has
    them: ``labels`` ``(batch,)`` for GLUE, ``start_positions`` / ``end_positions``
    ``(batch,)`` for SQuAD. K-prune never reads the gold targets; Kwon et al. do.
    A drawn sample also keeps :data:`DRAW_INDEX` ``(batch,)``: the sequences in draw order
    are a random order, which K-prune groups into gradient batches as the official code does.
    """

    batches: list[dict[str, torch.Tensor]]
    example_indices: tuple[int, ...] | None = None
    """The drawn rows of the train split, in draw order (a question of SQuAD may give several
    sequences, its windows); None for a sample made by hand, whose every sequence counts as one example."""

    def draw_indices(self) -> list[torch.Tensor]:
        """Per batch ``(batch,)``: each sequence's place in the draw order, ``0 .. num_sequences - 1``.
        A sample made without them (by hand) counts its sequences in batch order."""
        indices, offset = [], 0
        for batch in self.batches:
            size = int(batch["input_ids"].shape[0])
            indices.append(batch[DRAW_INDEX] if DRAW_INDEX in batch else torch.arange(offset, offset + size))
            offset += size
        return indices

    @property
    def num_sequences(self) -> int:
        """Model input sequences: one per example for GLUE, one per window for SQuAD."""
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    @property
    def num_examples(self) -> int:
        """Drawn rows of the train split (SQuAD: questions)."""
        return self.num_sequences if self.example_indices is None else len(self.example_indices)

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens."""
        return sum(int(b["attention_mask"].sum()) for b in self.batches)

    def in_draw_order(self, batch_size: int) -> "CalibrationSample":
        """The same sequences re-batched in draw order (a random order), ``batch_size`` per batch, each
        batch right-padded with zeros to its longest sequence (the attention mask marks padding).
        For methods whose result depends on which sequences share a batch, as in the official codes."""
        rows: list[tuple[int, dict[str, torch.Tensor]]] = []
        for batch, draw_index in zip(self.batches, self.draw_indices()):
            real = batch["attention_mask"].bool()  # (batch, seq)
            for row, index in enumerate(draw_index.tolist()):
                rows.append((index, {key: value[row][real[row]] if value.dim() == 2 else value[row]
                                     for key, value in batch.items() if key != DRAW_INDEX}))
        rows.sort(key=lambda item: item[0])
        batches = []
        for begin in range(0, len(rows), batch_size):
            chunk = rows[begin:begin + batch_size]
            batch = {key: pad_sequence([row[key] for _, row in chunk], batch_first=True) if first.dim() == 1
                     else torch.stack([row[key] for _, row in chunk])
                     for key, first in chunk[0][1].items()}
            batches.append({**batch, DRAW_INDEX: torch.tensor([index for index, _ in chunk])})
        return CalibrationSample(batches, self.example_indices)

    def model_inputs(self, batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
        """The model's inputs of ``batch`` (no targets), on ``device``."""
        return {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUT_KEYS}


@deferred_interrupts()  # datasets' fingerprinting would swallow Ctrl-C
def draw_calibration_sample(task: TaskSpec, train: Dataset, tokenizer: PreTrainedTokenizerBase, num_tokens: int,
                            seed: int, batch_size: int = 32) -> CalibrationSample:
    """Training examples drawn in a seeded random order until their tokens reach ``num_tokens``.

    Examples are drawn *without* replacement (the official K-prune code draws with
    replacement; here no example counts twice): the sample is the shortest prefix of a
    seeded permutation of ``train`` whose non-padding tokens (all features of a SQuAD
    question) reach ``num_tokens``. If the whole split has fewer tokens, all of it is used
    and a warning is logged. Only the drawn rows are tokenised: a first chunk estimates
    the tokens per row, later chunks top up. Features are tokenised with their gold
    targets (where ``train`` has them), sorted by length (longest first) and padded per batch
    of ``batch_size``; each keeps its place in the draw order (:data:`DRAW_INDEX`).
    """
    if num_tokens <= 0 or batch_size <= 0:
        raise UserError(f"num_tokens={num_tokens}, batch_size={batch_size}: both must be positive")
    if len(train) == 0:
        raise UserError(f"the train split of task {task.name} is empty: no calibration sample can be drawn")
    order = np.random.default_rng(seed).permutation(len(train))
    chunks, example_of, example_tokens = [], [], []  # per chunk: features, (features,), (rows,)
    drawn = total = 0
    while total < num_tokens and drawn < len(order):
        rows = FIRST_CHUNK_ROWS if drawn == 0 else math.ceil(1.1 * (num_tokens - total) * drawn / total) + 1
        features = tokenize_split(task, train.select(order[drawn:drawn + rows]), tokenizer,
                                  for_training=has_targets(task, train))
        index = _example_index(features)
        counts = np.bincount(index, weights=feature_lengths(features)).astype(np.int64)
        chunks.append(features)
        example_of.append(index + drawn)
        example_tokens.append(counts)
        drawn += len(counts)
        total += int(counts.sum())
    if total < num_tokens:
        logger.warning("the train split has %d tokens in %d examples, fewer than the %d asked for: "
                       "the calibration sample uses all of it", total, len(train), num_tokens)
    cumulative = np.cumsum(np.concatenate(example_tokens))
    kept_examples = min(int(np.searchsorted(cumulative, num_tokens)) + 1, len(cumulative))
    features = concatenate_datasets(chunks).select(np.flatnonzero(np.concatenate(example_of) < kept_examples))
    return _length_sorted_sample(features, order[:kept_examples], tokenizer, batch_size)


@deferred_interrupts()  # datasets' fingerprinting would swallow Ctrl-C
def draw_calibration_examples(task: TaskSpec, train: Dataset, tokenizer: PreTrainedTokenizerBase,
                              num_examples: int, seed: int, batch_size: int = 32) -> CalibrationSample:
    """The first ``num_examples`` rows of a seeded random permutation of ``train``, all their features.

    A sample counted in examples, as the official code of Kwon et al. draws it (2,048 training
    examples). Examples are drawn *without* replacement (the official code draws with replacement);
    a SQuAD question counts once, with all its windows (the official code draws windows). If the
    split has fewer rows, all of it is used and a warning is logged. Features are batched as by
    :func:`draw_calibration_sample`, and the same seed draws the same permutation: a sample of
    ``n`` examples is the first ``n`` of the order both functions use.
    """
    if num_examples <= 0 or batch_size <= 0:
        raise UserError(f"num_examples={num_examples}, batch_size={batch_size}: both must be positive")
    if len(train) == 0:
        raise UserError(f"the train split of task {task.name} is empty: no calibration sample can be drawn")
    if len(train) < num_examples:
        logger.warning("the train split has %d examples, fewer than the %d asked for: "
                       "the calibration sample uses all of it", len(train), num_examples)
    order = np.random.default_rng(seed).permutation(len(train))[:num_examples]
    features = tokenize_split(task, train.select(order), tokenizer, for_training=has_targets(task, train))
    return _length_sorted_sample(features, order, tokenizer, batch_size)


def _length_sorted_sample(features: Dataset, example_indices: np.ndarray, tokenizer: PreTrainedTokenizerBase,
                          batch_size: int) -> CalibrationSample:
    """``features`` (in draw order) sorted by length, longest first, and padded per batch of
    ``batch_size``; each keeps its place in the draw order (:data:`DRAW_INDEX`)."""
    batches = FeatureBatches(features, tokenizer)
    by_length = np.argsort(-batches.lengths, kind="stable")
    return CalibrationSample([
        {**batches.batch(by_length[begin:begin + batch_size]),
         DRAW_INDEX: torch.from_numpy(by_length[begin:begin + batch_size].copy())}
        for begin in range(0, len(by_length), batch_size)
    ], tuple(int(index) for index in example_indices))


def calibration_rows(task: TaskSpec, data: DatasetDict, source: str | None) -> tuple[Dataset, list[str]]:
    """The rows the sample is drawn from, and a note for the report: the task's train split in
    ``data`` (``source`` None, no note), or the unlabeled text file ``source``
    (:mod:`kprune_cli.tasks.unlabeled`)."""
    if source is None:
        return data[task.train_split], []
    rows = read_unlabeled(task, source)
    return rows, [f"calibration sample drawn from the unlabeled file {source} ({len(rows)} examples), "
                  f"not from the train split"]


def has_targets(task: TaskSpec, rows: Dataset) -> bool:
    """Whether ``rows`` carry the task's gold targets (labels, or SQuAD answers; an unlabeled kind has none)."""
    columns = kind_of(task).target_columns(task)
    return bool(columns) and all(column in rows.column_names for column in columns)


def _example_index(features: Dataset) -> np.ndarray:
    """``(features,)``: which row of the tokenised rows each feature comes from (SQuAD
    windows of one question are consecutive and share its ``example_id``)."""
    if "example_id" not in features.column_names:
        return np.arange(len(features))
    ids = features["example_id"]
    return np.cumsum([0] + [current != previous for previous, current in zip(ids, ids[1:])])
