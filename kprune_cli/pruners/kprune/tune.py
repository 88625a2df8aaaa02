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
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedModel

from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.masks import Masks
from kprune_cli.pruners.common import sublayer_parts
from kprune_cli.pruners.common.lstsq import DEFAULT_RIDGE, solve_ridge
from kprune_cli.pruners.common.reconstruction import normal_equations
from kprune_cli.pruners.common.teacher import DistillBatch

KPWT_RIDGE = DEFAULT_RIDGE
"""Relative ridge of the KPWT solve (``λ = KPWT_RIDGE · mean(diag(AᵀA))``); grows tenfold on failure."""


def kpwt(model: PreTrainedModel, adapter: ModelAdapter, masks: Masks, batches: Sequence[DistillBatch],
         teacher_sums: Sequence[torch.Tensor], sublayer: int, ridge: float = KPWT_RIDGE,
         hidden: Sequence[torch.Tensor] | None = None, precision: str = "float64") -> list[str]:
    """Re-fit the survivors' output-projection columns of ``sublayer`` in place.

    ``hidden[i]`` (optional): the student's hidden states entering the sub-layer's layer on
    ``batches[i]``; the passes then start there instead of at the embeddings. ``precision``: of
    the normal equations' per-micro-batch products (see
    :func:`~kprune_cli.pruners.common.reconstruction.normal_equations`).
    Returns notes for the report: empty on a clean solve, one line when the ridge had to grow
    or when every attempt failed (the sub-layer is then left untuned).
    """
    system = normal_equations(model, adapter, masks, batches, teacher_sums, sublayer, hidden, precision)
    if system.columns.numel() == 0:
        return []  # no survivors: only the bias is left, nothing to fit
    parts, kind = sublayer_parts(adapter, sublayer)
    proj = parts.out_proj(kind)
    where = f"KPWT sub-layer {sublayer} ({kind.upper()} of layer {sublayer // 2})"
    prior = proj.weight.detach()[:, system.columns].T  # (k, d)
    result = solve_ridge(system.gram, system.rhs, prior, ridge)
    if result.solution is None:
        return [f"{where}: least squares failed up to relative ridge {result.ridge:g} "
                f"(singular or non-finite system); sub-layer left untuned"]
    with torch.no_grad():
        proj.weight[:, system.columns] = result.solution.T.to(proj.weight.dtype)
    if result.fell_back:
        return [f"{where}: solved only with relative ridge {result.ridge:g} "
                f"({result.attempts - 1} fallback(s) from {ridge:g})"]
    return []
