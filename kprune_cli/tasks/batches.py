"""Padded batches of tokenised features, gathered from their Arrow columns in one vectorised step.

Building a batch from Python lists (``Dataset.select(...).to_list()`` and padding row by row) costs
about 23 ms per batch of 64 SQuAD windows on a CPU core: more than a base model's forward pass on a
GPU. :class:`FeatureBatches` reads each column once, keeps the token columns flat with their row
offsets, and pads any set of rows with one NumPy gather.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from kprune_cli.tasks.data import MODEL_INPUT_KEYS, TARGET_KEYS


class FeatureBatches:
    """The model inputs and targets of ``features``, padded per batch on the right.

    ``batch(rows)`` gives ``(batch, seq)`` int64 model inputs (``input_ids`` padded with the
    tokenizer's pad id, ``attention_mask`` with 0, ``token_type_ids`` with its pad type id), ``seq``
    the longest of those rows, plus ``(batch,)`` targets (``labels``: int64 classes or float32 scores;
    ``start_positions`` / ``end_positions``) where ``features`` has them. Other columns
    (``example_id``, ``offset_mapping``) are left out. ``pin_memory``: the tensors are allocated in
    page-locked memory, for asynchronous copies to a GPU.
    """

    def __init__(self, features: Dataset, tokenizer: PreTrainedTokenizerBase, pin_memory: bool = False) -> None:
        pad_values = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0,
                      "token_type_ids": tokenizer.pad_token_type_id}
        tokens = [key for key in MODEL_INPUT_KEYS if key in features.column_names]
        targets = [key for key in TARGET_KEYS if key in features.column_names]
        table = features.with_format("arrow", columns=tokens + targets)[:]
        self._tokens = {key: (*_flat(table[key]), pad_values[key]) for key in tokens}
        self._targets = {key: _target_array(table[key]) for key in targets}
        self._pin_memory = pin_memory

    @property
    def lengths(self) -> np.ndarray:
        """``(rows,)`` unpadded token counts (what :func:`~kprune_cli.tasks.data.feature_lengths` reads)."""
        offsets = self._tokens["input_ids"][0]
        return offsets[1:] - offsets[:-1]

    def batch(self, rows: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """The features ``rows`` (indices into ``features``, in the batch's order), padded."""
        rows = np.asarray(rows, dtype=np.int64)
        batch = {}
        for key, (offsets, values, pad) in self._tokens.items():
            starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
            positions = np.arange(lengths.max())
            inside = positions < lengths[:, None]  # (batch, seq)
            gathered = values[np.where(inside, starts[:, None] + positions, 0)]
            batch[key] = self._tensor(np.where(inside, gathered, pad).astype(np.int64))
        for key, values in self._targets.items():
            batch[key] = self._tensor(values[rows])
        return batch

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.pin_memory() if self._pin_memory else tensor


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column as ``(rows + 1,)`` offsets into ``(tokens,)`` values: row i is
    ``values[offsets[i]:offsets[i + 1]]``."""
    array = column.combine_chunks()
    return array.offsets.to_numpy().astype(np.int64), array.values.to_numpy(zero_copy_only=False)


def _target_array(column: pa.ChunkedArray) -> np.ndarray:
    """``(rows,)`` targets: floating scores as float32, integers as int64 (``torch.tensor``'s types
    for Python floats and ints)."""
    values = column.to_numpy()
    return values.astype(np.float32 if np.issubdtype(values.dtype, np.floating) else np.int64)
