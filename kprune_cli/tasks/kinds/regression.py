"""Sequence regression (STS-B): one score per example; distilled by squared error."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from transformers.utils import ModelOutput

from kprune_cli.tasks.kinds.classification import Classification


class Regression(Classification):
    """A :class:`Classification` head with one output, ``logits`` ``(batch, 1)``, read as the score."""

    name: ClassVar[str] = "regression"
    label_type: ClassVar[type] = float
    problem_type: ClassVar[str] = "regression"

    def soft_target(self, outputs: ModelOutput, temperature: float, token_mask: torch.Tensor) -> torch.Tensor:
        """The teacher's raw outputs ``(batch, 1)``."""
        return outputs.logits.detach()

    def distillation_loss(self, outputs: ModelOutput, target: torch.Tensor, temperature: float,
                          token_mask: torch.Tensor) -> torch.Tensor:
        """Squared error, mean over outputs: ``(batch,)``."""
        return (outputs.logits - target).pow(2).mean(dim=-1)

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        return logits[:, 0]
