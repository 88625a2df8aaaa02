"""Knowledge-preserving weight-tuning, KPWT (K-prune step 3; docs/design.md §3).

After the search fixed which units of sub-layer ``s`` survive, re-fit the columns of its output
projection that belong to the survivors so that the student's residual sum matches the
teacher's on the sample's real tokens:

    min_W ||A·Wᵀ − (Y_teacher − X_student − b)||²

``A`` ``(tokens, k)``: the survivors' activations (the projection's input) in the current model;
``X_student`` ``(tokens, d)``: the sub-layer's input; ``b``: the projection's bias (kept);
``Y_teacher`` ``(tokens, d)``: the teacher's residual sum. The normal equations
(:func:`~kprune_cli.pruners.common.reconstruction.normal_equations`) are accumulated in float64
over micro-batches of a forward pass that stops right after sub-layer ``s`` (starting at its
layer from cached hidden states, when given), and solved
by :func:`~kprune_cli.pruners.common.lstsq.solve_ridge` with a small ridge towards the current
weights (:data:`KPWT_RIDGE`). Pruned units' columns are left as they are: their masks are zero
and the pipeline slices them away.

Affine KPWT (``affine=True``, the opt-in ``pruner.affine_tuning``): the bias is re-fitted with the
weights, ``min_{W, c} ||A·Wᵀ + c − (Y_teacher − X_student)||²``, by solving the centred system and
setting ``b = mean(Y_teacher − X_student) − W·mean(A)`` (:mod:`~kprune_cli.pruners.common.affine`);
an emptied sub-layer then gets its best constant output as bias. A projection without a bias
(ModernBERT) is fitted plainly (the pruner notes it once).

Held-out check (plain KPWT, ``check=True``): the same pass keeps the equations of two interleaved
halves of the micro-batches, and the fit on each half is scored on the other
(:mod:`~kprune_cli.pruners.common.held_out`); the ratio to the untuned weights' error says whether
the fit carries over beyond the sample. It costs a few extra solves and changes nothing. With
``ridge="auto"`` (``pruner.ridge=auto``, opt-in, a deviation from the paper) the relative ridge is
the one of :data:`~kprune_cli.pruners.common.held_out.RIDGE_GRID` with the smallest held-out error,
and a sub-layer that no ridge improves on held-out tokens is left untuned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import PreTrainedModel

from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.masks import Masks
from kprune_cli.pruners.common import sublayer_parts
from kprune_cli.pruners.common.affine import centred, refit_bias
from kprune_cli.pruners.common.held_out import UNTUNED, cross_validated_ridge, held_out_errors
from kprune_cli.pruners.common.lstsq import DEFAULT_RIDGE, solve_ridge
from kprune_cli.pruners.common.reconstruction import NormalEquations, normal_equations
from kprune_cli.pruners.common.teacher import DistillBatch

KPWT_RIDGE = DEFAULT_RIDGE
"""Relative ridge of the KPWT solve (``λ = KPWT_RIDGE · mean(diag(AᵀA))``); grows tenfold on failure."""

HELD_OUT_FOLDS = 2
"""Interleaved parts of the micro-batches for the held-out check and ``ridge="auto"``."""


@dataclass
class Tuning:
    """What :func:`kpwt` did to one sub-layer: ``notes`` for the report; ``ridge``: the relative ridge
    of the solve (:data:`~kprune_cli.pruners.common.held_out.UNTUNED`: left as it was; ``None``:
    nothing was solved); ``held_out``: the held-out error of the fit at that ridge over the untuned
    weights' (above 1: the fit made unseen tokens worse; ``None``: not checked)."""

    notes: list[str] = field(default_factory=list)
    ridge: float | None = None
    held_out: float | None = None


def kpwt(model: PreTrainedModel, adapter: ModelAdapter, masks: Masks, batches: Sequence[DistillBatch],
         teacher_sums: Sequence[torch.Tensor], sublayer: int, ridge: float | str = KPWT_RIDGE,
         hidden: Sequence[torch.Tensor] | None = None, precision: str = "float64",
         affine: bool = False, check: bool = False) -> Tuning:
    """Re-fit the survivors' output-projection columns of ``sublayer`` in place (and its bias when ``affine``).

    ``hidden[i]`` (optional): the student's hidden states entering the sub-layer's layer on
    ``batches[i]``; the passes then start there instead of at the embeddings. ``precision``: of
    the normal equations' per-micro-batch products (see
    :func:`~kprune_cli.pruners.common.reconstruction.normal_equations`). ``ridge``: relative, or
    ``"auto"`` (cross-validated; plain KPWT only); ``check``: score the fit on held-out halves of the
    sample (plain KPWT only; needs two micro-batches or more, else skipped).
    Its notes are empty on a clean solve, one line when the ridge had to grow or when every
    attempt failed (the sub-layer is then left untuned).
    """
    auto = ridge == "auto"
    folds = HELD_OUT_FOLDS if (check or auto) and not affine else 0
    system = normal_equations(model, adapter, masks, batches, teacher_sums, sublayer, hidden, precision, folds)
    parts, kind = sublayer_parts(adapter, sublayer)
    proj = parts.out_proj(kind)
    where = f"KPWT sub-layer {sublayer} ({kind.upper()} of layer {sublayer // 2})"
    affine = affine and proj.bias is not None
    if system.columns.numel() == 0:  # no survivors: only the bias is left
        if affine:
            write_fit(proj, system, _all(system), system.rhs, affine)  # rhs: (0, d), the empty solution
        return Tuning()
    gram, rhs = fit_system(system, affine)
    prior = proj.weight.detach()[:, system.columns].T  # (k, d)
    tuning = Tuning(ridge=KPWT_RIDGE if auto else float(ridge))
    if system.folds and auto:
        tuning.ridge, errors = cross_validated_ridge(system.folds, prior)
        tuning.held_out = errors.ratio(tuning.ridge) if tuning.ridge != UNTUNED else 1.0
    elif system.folds:
        tuning.held_out = held_out_errors(system.folds, prior, [tuning.ridge]).ratio(tuning.ridge)
    if tuning.ridge == UNTUNED:
        return tuning
    result = solve_ridge(gram, rhs, prior, tuning.ridge)
    if result.solution is None:
        tuning.notes.append(f"{where}: least squares failed up to relative ridge {result.ridge:g} "
                            f"(singular or non-finite system); sub-layer left untuned")
        return tuning
    write_fit(proj, system, _all(system), result.solution, affine)
    nominal, tuning.ridge = tuning.ridge, result.ridge
    if result.fell_back:
        tuning.notes.append(f"{where}: solved only with relative ridge {result.ridge:g} "
                            f"({result.attempts - 1} fallback(s) from {nominal:g})")
    return tuning


def fit_system(system: NormalEquations, affine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gram (k, k), rhs (k, d))`` to solve: the normal equations as they are, or centred when ``affine``."""
    if not affine:
        return system.gram, system.rhs
    return centred(system.gram, system.rhs, system.a_sum, system.residual_sum, system.tokens)


@torch.no_grad()
def write_fit(proj: torch.nn.Linear, system: NormalEquations, kept: torch.Tensor, solution: torch.Tensor,
              affine: bool) -> None:
    """Write ``solution`` ``(kept.sum(), d)`` into the columns ``system.columns[kept]`` of ``proj``
    (``kept`` ``(k,)`` bool over the system's columns) and, when ``affine``, the re-fitted bias."""
    columns = system.columns[kept]
    if columns.numel():
        proj.weight[:, columns] = solution.T.to(proj.weight.dtype)
    if affine:
        proj.bias.copy_(refit_bias(proj.bias.detach(), solution, system.a_sum[kept],
                                   system.residual_sum, system.tokens))


def _all(system: NormalEquations) -> torch.Tensor:
    """``(k,)`` bool, all True: every column of ``system`` is kept."""
    return torch.ones(system.columns.numel(), dtype=torch.bool, device=system.columns.device)
