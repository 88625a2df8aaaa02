"""The ridge least-squares solve behind every weight- or mask-tuning step.

Given the normal equations of ``min_W ||A W - R||²`` (``gram = AᵀA``, ``rhs = AᵀR``, both
accumulated in float64), solve

    (gram + λ·I) W = rhs + λ·prior

i.e. least squares plus ``λ·||W - prior||²``. ``prior`` is the current solution (the current
weights); without one it is zero (a plain ridge). Regularising towards the current weights is a
deliberate choice: directions the sample does not excite keep their weights instead of being
shrunk to zero, and the objective at the solution is never worse than at ``prior``.

λ is relative: ``ridge · mean(diag(gram))``, so it does not depend on the activations' scale.
When Cholesky fails or the result is not finite, λ grows tenfold and the solve is retried;
the caller decides what to do (and what to report) when all attempts fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_RIDGE = 1e-6
"""Relative ridge ``λ / mean(diag(AᵀA))`` of the first attempt (our choice; the official K-prune
code calls an unregularised ``lstsq``)."""

RIDGE_GROWTH = 10.0
MAX_ATTEMPTS = 4


@dataclass
class RidgeSolution:
    """``solution`` ``(k, m)`` or ``None`` when every attempt failed; ``ridge``: the relative
    ridge of the last attempt; ``attempts``: how many were made (1 = no fallback)."""

    solution: torch.Tensor | None
    ridge: float
    attempts: int

    @property
    def fell_back(self) -> bool:
        return self.attempts > 1 or self.solution is None


def solve_ridge(gram: torch.Tensor, rhs: torch.Tensor, prior: torch.Tensor | None = None,
                ridge: float = DEFAULT_RIDGE, max_attempts: int = MAX_ATTEMPTS) -> RidgeSolution:
    """Solve ``(gram + λI) W = rhs + λ·prior`` by Cholesky, growing λ on failure.

    ``gram``: ``(k, k)``, ``rhs`` and ``prior``: ``(k, m)``. Computed in float64.
    """
    gram = gram.double()
    rhs = rhs.double()
    prior = torch.zeros_like(rhs) if prior is None else prior.double()
    scale = gram.diagonal().mean().item() if gram.numel() else 0.0
    if not (math.isfinite(scale) and scale > 0):  # all-zero (or broken) activations
        scale = 1.0
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for attempt in range(1, max_attempts + 1):
        lam = ridge * scale
        factor, info = torch.linalg.cholesky_ex(gram + lam * eye)
        if int(info) == 0:
            solution = torch.cholesky_solve(rhs + lam * prior, factor)
            if torch.isfinite(solution).all():
                return RidgeSolution(solution, ridge, attempt)
        if attempt < max_attempts:
            ridge *= RIDGE_GROWTH
    return RidgeSolution(None, ridge, max_attempts)
