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

after which the rows and columns ``M`` are zero; they are dropped from the matrices whenever half
of the rows held are such (so the ``O(n²)`` steps get cheaper as units go) and at the end. :func:`greedy_removal`
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
    present = torch.arange(size // width, device=gram.device)  # units whose columns the matrices hold
    remaining = candidates.to(gram.device).sort().values  # ascending: argmin's first minimum is the lowest index
    removed: list[int] = []
    offsets = torch.arange(width, device=gram.device)
    eye_w = torch.eye(width, dtype=torch.float64, device=gram.device)
    stale = torch.zeros(len(present), dtype=torch.bool, device=gram.device)  # removed units still held (zero rows)
    for _ in range(count):
        rows = torch.searchsorted(present, remaining)[:, None] * width + offsets  # (c, w): their columns
        blocks = inverse[rows[:, :, None], rows[:, None, :]]  # (c, w, w): (G⁻¹)_MM per candidate
        weights = solution[rows]  # (c, w, m): W*_M per candidate
        factor, info = torch.linalg.cholesky_ex(blocks)
        cost = (weights * torch.cholesky_solve(weights, factor)).sum(dim=(1, 2))  # (c,)
        cost = torch.where((info == 0) & torch.isfinite(cost), cost, torch.full_like(cost, float("inf")))
        best = int(torch.argmin(cost))
        if not torch.isfinite(cost[best]):
            return Removal(removed, None, fit.ridge, fit.attempts)
        block = rows[best]
        left = inverse[:, block] @ torch.cholesky_solve(eye_w, factor[best])  # (p·w, w): G⁻¹_{:,M}[(G⁻¹)_MM]⁻¹
        solution.addmm_(left, solution[block], alpha=-1)  # in place: no (p·w)² temporary per step
        inverse.addmm_(left, inverse[block], alpha=-1)
        removed.append(int(remaining[best]))
        remaining = torch.cat([remaining[:best], remaining[best + 1:]])
        stale[block[0] // width] = True
        if 2 * len(removed) - 2 * (size // width - len(present)) >= len(present) or len(removed) == count:
            kept_columns = (~stale).repeat_interleave(width)  # drop the stale rows: later steps get cheaper
            present, solution = present[~stale], solution[kept_columns]
            inverse, stale = inverse[kept_columns][:, kept_columns], stale[~stale]
    return Removal(removed, solution, fit.ridge, fit.attempts)
