"""How well a reconstruction fit carries over to tokens it did not see, from the folds' normal equations.

KPWT fits ``k`` columns per output from the sample's tokens. When the sample is small for the
width kept (a few thousand tokens for a 3,072-neuron FFN), the fit interpolates the sample and
the sub-layer gets worse on every other input: measured on all-mpnet-base-v2 with 1,511 tokens,
every re-fitted sub-layer's error on held-out tokens rose above the untuned one (up to 640×), and
the pruned embedding model fell from 93.6 to 14.5 Spearman (docs/method.md).

With the sample's micro-batches split into interleaved folds
(:class:`~kprune_cli.pruners.common.reconstruction.FoldEquations`), the fit on the other folds
is scored on each fold from its equations alone: for ``W`` ``(k, d)``,

    error_f(W) = energy_f − 2·Σ(W ⊙ rhs_f) + Σ(W ⊙ gram_f·W)         (= ||A_f·W − R_f||²)

:func:`held_out_errors` gives the total over the folds for each ridge asked for and for the
untuned weights (the prior): K-prune checks its fit with it on every run (a report note when the
fit made held-out tokens worse) and, with ``pruner.ridge=auto``, chooses the ridge that carries
over best (:func:`cross_validated_ridge`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from kprune_cli.pruners.common.lstsq import solve_ridge
from kprune_cli.pruners.common.reconstruction import FoldEquations

RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Relative ridges :func:`cross_validated_ridge` chooses from (besides leaving the sub-layer untuned)."""

UNTUNED = math.inf
"""The ridge that stands for "keep the current weights" (the limit of an ever larger ridge towards them)."""


@dataclass
class HeldOutErrors:
    """Squared reconstruction errors on held-out folds, summed over the folds: ``untuned`` for the
    prior (the current weights), ``by_ridge`` for the ridge fit on the other folds at each relative ridge
    (``inf`` where the solve failed)."""

    untuned: float
    by_ridge: dict[float, float]

    def ratio(self, ridge: float) -> float:
        """The held-out error at ``ridge`` over the untuned one (above 1: the fit made it worse)."""
        return self.by_ridge[ridge] / self.untuned if self.untuned > 0 else 1.0

    def best(self) -> float:
        """The ridge with the smallest held-out error, :data:`UNTUNED` if none beats the prior
        (ties go to the smaller ridge)."""
        ridge = min(self.by_ridge, key=lambda value: (self.by_ridge[value], value))
        return ridge if self.by_ridge[ridge] < self.untuned else UNTUNED


def fold_error(fold: FoldEquations, weights: torch.Tensor) -> float:
    """``||A_f·W − R_f||²`` of ``weights`` ``(k, d)`` on ``fold``, from its equations (float64)."""
    weights = weights.double()
    return float(fold.energy - 2.0 * (weights * fold.rhs).sum() + (weights * (fold.gram @ weights)).sum())


def held_out_errors(folds: Sequence[FoldEquations], prior: torch.Tensor,
                    ridges: Sequence[float]) -> HeldOutErrors:
    """Each fold scored with the fit on the other folds (``(gram + λI) W = rhs + λ·prior``, λ relative as in
    :func:`~kprune_cli.pruners.common.lstsq.solve_ridge`, without its growth on failure) at every
    ridge of ``ridges``, and with ``prior`` ``(k, d)`` itself. Needs at least two folds."""
    if len(folds) < 2:
        raise ValueError(f"held-out errors need at least two folds, got {len(folds)}")
    total_gram = sum(fold.gram for fold in folds)
    total_rhs = sum(fold.rhs for fold in folds)
    others = [(total_gram - fold.gram, total_rhs - fold.rhs) for fold in folds]  # each fold's training system
    untuned = sum(fold_error(fold, prior) for fold in folds)
    by_ridge = {}
    for ridge in ridges:
        error = 0.0
        for fold, (gram, rhs) in zip(folds, others):
            fit = solve_ridge(gram, rhs, prior, ridge, max_attempts=1)
            error += fold_error(fold, fit.solution) if fit.solution is not None else math.inf
        by_ridge[float(ridge)] = error
    return HeldOutErrors(untuned, by_ridge)


def cross_validated_ridge(folds: Sequence[FoldEquations], prior: torch.Tensor,
                          grid: Sequence[float] = RIDGE_GRID) -> tuple[float, HeldOutErrors]:
    """The relative ridge of ``grid`` whose fits carry over best to the held-out folds, or
    :data:`UNTUNED` when none beats the prior ``(k, d)``; with the errors it was chosen on."""
    errors = held_out_errors(folds, prior, grid)
    return errors.best(), errors
