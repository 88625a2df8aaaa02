"""The calibration sample: a fixed-seed draw of ~num_tokens tokens from the train split."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class CalibrationSample:
    """Tokenised batches, sorted by length to cut padding.

    Each batch maps ``input_ids`` / ``attention_mask`` (and ``token_type_ids`` where the
    model uses them) to ``(batch, seq)`` tensors, plus gold targets where the data has
    them: ``labels`` ``(batch,)`` for GLUE, ``start_positions`` / ``end_positions``
    ``(batch,)`` for SQuAD. K-prune never reads the gold targets; Kwon et al. do.
    """

    batches: list[dict[str, torch.Tensor]]

    @property
    def num_examples(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens."""
        return sum(int(b["attention_mask"].sum()) for b in self.batches)

    def model_inputs(self, batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
        """The model's inputs of ``batch`` (no targets), on ``device``."""
        return {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUT_KEYS}
