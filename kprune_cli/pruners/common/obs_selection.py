"""Compensation-aware unit removal: structured optimal-brain-surgeon selection on the ridge
least-squares reconstruction of one sub-layer (the idea of ZipLM, NeurIPS 2023, and SlimGPT,
NeurIPS 2024, in our own algebra).

The system is KPWT's (:mod:`~kprune_cli.pruners.common.reconstruction`) over the columns of the
``n`` alive units of a sub-layer, unit ``i`` owning the ``w`` consecutive columns ``i·w … i·w + w − 1``
(``w = d_h`` for heads, 1 for neurons): with ``P`` ``(n·w, m)`` the current weights (the prior),

    G = AᵀA + λI   (n·w, n·w)          B = AᵀR + λP   (n·w, m)          W* = G⁻¹B

minimises ``E(W) = ||A·W − R||² + λ||W − P||²`` (λ: KPWT's relative ridge times ``mean(diag(AᵀA))``,
grown tenfold on failure, as in :func:`~kprune_cli.pruners.common.lstsq.solve_ridge`). Forcing the
columns ``M`` of one unit to zero and re-fitting the others raises the optimum by

    cost(M) = tr(W*_Mᵀ · [(G⁻¹)_MM]⁻¹ · W*_M)

and the re-fitted optimum and inverse follow by rank-``|M|`` updates,

    W* ← W* − (G⁻¹)_{:,M} [(G⁻¹)_MM]⁻¹ W*_M          G⁻¹ ← G⁻¹ − (G⁻¹)_{:,M} [(G⁻¹)_MM]⁻¹ (G⁻¹)_{M,:}

after which the rows and columns ``M`` are zero (they are then left out). :func:`greedy_removal`
removes, one at a time, the candidate of least cost; the final ``W*`` over the survivors is the
ridge solution of the survivors' own system (``(G_SS)⁻¹ B_S``), i.e. KPWT's, so no further solve is needed.

Tie rule: among candidates of equal cost the lowest unit index goes first. Guard: a candidate whose
block ``(G⁻¹)_MM`` is not numerically positive definite costs ``+inf``; when every candidate does,
the removal fails (``solution is None``) and the caller falls back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kprune_cli.pruners.common.lstsq import solve_ridge


@dataclass
class Removal:
    """``removed``: unit indices in the order they were removed; ``solution`` ``(k·w, m)``: ``W*``
    over the survivors' columns in ascending order (``None`` when the solve or a removal step
    failed); ``ridge``/``attempts``: of the initial solve, as in
    :class:`~kprune_cli.pruners.common.lstsq.RidgeSolution`."""

    removed: list[int]
    solution: torch.Tensor | None
    ridge: float
    attempts: int


def greedy_removal(gram: torch.Tensor, rhs: torch.Tensor, prior: torch.Tensor, width: int,
                   candidates: torch.Tensor, count: int, ridge: float) -> Removal:
    """Remove ``count`` units among ``candidates`` ``(c,)`` (unit indices) greedily by least ``cost``.

    ``gram`` ``(n·w, n·w)`` = ``AᵀA``, ``rhs`` ``(n·w, m)`` = ``AᵀR`` and ``prior`` ``(n·w, m)`` over
    the columns of ``n`` units of ``width`` columns each; ``ridge`` relative, as in
    :func:`~kprune_cli.pruners.common.lstsq.solve_ridge`. Computed in float64.
    """
    if count > candidates.numel():
        raise ValueError(f"cannot remove {count} units out of {candidates.numel()} candidates")
    size, outputs = rhs.shape
    eye = torch.eye(size, dtype=torch.float64, device=gram.device)
    # One solve gives W* and G⁻¹ with the same λ: the identity right-hand side has no prior.
    fit = solve_ridge(gram, torch.cat([rhs.double(), eye], dim=1),
                      torch.cat([prior.double(), torch.zeros_like(eye)], dim=1), ridge)
    if fit.solution is None:
        return Removal([], None, fit.ridge, fit.attempts)
    solution, inverse = fit.solution.split([outputs, size], dim=1)
    solution, inverse = solution.clone(), (inverse + inverse.T) / 2
    remaining = sorted(int(unit) for unit in candidates)
    removed: list[int] = []
    offsets = torch.arange(width, device=gram.device)
    for _ in range(count):
        units = torch.tensor(remaining, device=gram.device)
        columns = (units[:, None] * width + offsets).flatten()  # (c·w,)
        blocks = inverse[columns][:, columns].view(len(remaining), width, len(remaining), width)
        blocks = blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (c, w, w): (G⁻¹)_MM per candidate
        weights = solution[columns].view(len(remaining), width, outputs)  # (c, w, m): W*_M per candidate
        factor, info = torch.linalg.cholesky_ex(blocks)
        cost = (weights * torch.cholesky_solve(weights, factor)).sum(dim=(1, 2))  # (c,)
        cost = torch.where((info == 0) & torch.isfinite(cost), cost, torch.full_like(cost, float("inf")))
        best = int(torch.argmin(cost))  # the first minimum: the lowest unit index on ties
        if not torch.isfinite(cost[best]):
            return Removal(removed, None, fit.ridge, fit.attempts)
        unit = remaining.pop(best)
        block = slice(unit * width, (unit + 1) * width)
        step = torch.cholesky_solve(torch.eye(width, dtype=torch.float64, device=gram.device), factor[best])
        left = inverse[:, block] @ step  # (n·w, w): (G⁻¹)_{:,M} [(G⁻¹)_MM]⁻¹
        solution -= left @ solution[block]
        inverse -= left @ inverse[block]
        removed.append(unit)
    alive = torch.ones(size // width, dtype=torch.bool, device=gram.device)
    alive[removed] = False
    return Removal(removed, solution[alive.repeat_interleave(width)], fit.ridge, fit.attempts)
