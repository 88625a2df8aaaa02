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
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedModel

from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.masks import Masks
from kprune_cli.pruners.common import sublayer_parts
from kprune_cli.pruners.common.affine import centred, refit_bias
from kprune_cli.pruners.common.lstsq import DEFAULT_RIDGE, solve_ridge
from kprune_cli.pruners.common.reconstruction import NormalEquations, normal_equations
from kprune_cli.pruners.common.teacher import DistillBatch

KPWT_RIDGE = DEFAULT_RIDGE
"""Relative ridge of the KPWT solve (``λ = KPWT_RIDGE · mean(diag(AᵀA))``); grows tenfold on failure."""


def kpwt(model: PreTrainedModel, adapter: ModelAdapter, masks: Masks, batches: Sequence[DistillBatch],
         teacher_sums: Sequence[torch.Tensor], sublayer: int, ridge: float = KPWT_RIDGE,
         hidden: Sequence[torch.Tensor] | None = None, precision: str = "float64",
         affine: bool = False) -> list[str]:
    """Re-fit the survivors' output-projection columns of ``sublayer`` in place (and its bias when ``affine``).

    ``hidden[i]`` (optional): the student's hidden states entering the sub-layer's layer on
    ``batches[i]``; the passes then start there instead of at the embeddings. ``precision``: of
    the normal equations' per-micro-batch products (see
    :func:`~kprune_cli.pruners.common.reconstruction.normal_equations`).
    Returns notes for the report: empty on a clean solve, one line when the ridge had to grow
    or when every attempt failed (the sub-layer is then left untuned).
    """
    system = normal_equations(model, adapter, masks, batches, teacher_sums, sublayer, hidden, precision)
    parts, kind = sublayer_parts(adapter, sublayer)
    proj = parts.out_proj(kind)
    where = f"KPWT sub-layer {sublayer} ({kind.upper()} of layer {sublayer // 2})"
    affine = affine and proj.bias is not None
    if system.columns.numel() == 0:  # no survivors: only the bias is left
        if affine:
            write_fit(proj, system, _all(system), system.rhs, affine)  # rhs: (0, d), the empty solution
        return []
    gram, rhs = fit_system(system, affine)
    prior = proj.weight.detach()[:, system.columns].T  # (k, d)
    result = solve_ridge(gram, rhs, prior, ridge)
    if result.solution is None:
        return [f"{where}: least squares failed up to relative ridge {result.ridge:g} "
                f"(singular or non-finite system); sub-layer left untuned"]
    write_fit(proj, system, _all(system), result.solution, affine)
    if result.fell_back:
        return [f"{where}: solved only with relative ridge {result.ridge:g} "
                f"({result.attempts - 1} fallback(s) from {ridge:g})"]
    return []


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
