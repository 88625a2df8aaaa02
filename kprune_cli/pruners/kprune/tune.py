"""Knowledge-preserving weight-tuning, KPWT (K-prune step 3; DESIGN.md §3).

After the search fixed which units of sub-layer ``s`` survive, re-fit the columns of its output
projection that belong to the survivors so that the student's pre-LN residual sum matches the
teacher's on the sample's real tokens:

    min_W ||A·Wᵀ − (Y_teacher − X_student − b)||²

``A`` ``(tokens, k)``: the survivors' activations (the projection's input) in the current model;
``X_student`` ``(tokens, d)``: the sub-layer's input; ``b``: the projection's bias (kept);
``Y_teacher`` ``(tokens, d)``: the teacher's pre-LN sum. The normal equations are accumulated in
float64 over micro-batches of a forward pass that stops right after sub-layer ``s``, and solved
by :func:`~kprune_cli.pruners.common.lstsq.solve_ridge` with a small ridge towards the current
weights (:data:`KPWT_RIDGE`). Pruned units' columns are left as they are: their masks are zero
and the pipeline slices them away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedModel

from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.pruners.common import sublayer_parts, unit_width
from kprune_cli.pruners.common.hooks import capture_inputs, forward_until
from kprune_cli.pruners.common.lstsq import DEFAULT_RIDGE, solve_ridge
from kprune_cli.pruners.common.teacher import DistillBatch

KPWT_RIDGE = DEFAULT_RIDGE
"""Relative ridge of the KPWT solve (``λ = KPWT_RIDGE · mean(diag(AᵀA))``); grows tenfold on failure."""


@dataclass
class NormalEquations:
    """``gram = AᵀA`` ``(k, k)`` and ``rhs = Aᵀ(Y − X − b)`` ``(k, d)`` in float64, over the
    ``columns`` ``(k,)`` of the output projection that belong to surviving units."""

    gram: torch.Tensor
    rhs: torch.Tensor
    columns: torch.Tensor


def kept_columns(adapter: ModelAdapter, masks: Masks, sublayer: int) -> torch.Tensor:
    """Indices of the output projection's input columns whose unit has a non-zero mask."""
    parts, kind = sublayer_parts(adapter, sublayer)
    mask = masks.of(kind)[sublayer // 2]
    return (mask.repeat_interleave(unit_width(parts, kind)) != 0).nonzero().squeeze(1)


@torch.no_grad()
def sublayer_activations(model: PreTrainedModel, adapter: ModelAdapter, masks: Masks, batch: DistillBatch,
                         sublayer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's sub-layer input ``X`` ``(tokens, d)`` and projection input ``A`` ``(tokens, width)``
    on the real tokens of ``batch``, from a forward pass that stops after the sub-layer."""
    parts, kind = sublayer_parts(adapter, sublayer)
    sublayer_input = parts.query if kind == "mha" else parts.ffn_in
    with apply_masks(adapter, masks), capture_inputs({"x": sublayer_input, "a": parts.out_proj(kind)}) as acts:
        forward_until(model, batch.inputs, parts.norm(kind))
    return acts["x"][batch.token_mask], acts["a"][batch.token_mask]


def normal_equations(model: PreTrainedModel, adapter: ModelAdapter, masks: Masks, batches: Sequence[DistillBatch],
                     teacher_sums: Sequence[torch.Tensor], sublayer: int) -> NormalEquations:
    """Accumulate KPWT's normal equations for ``sublayer`` over the micro-batches.

    ``teacher_sums[i]``: the teacher's pre-LN residual sum on the real tokens of ``batches[i]``.
    """
    parts, kind = sublayer_parts(adapter, sublayer)
    proj = parts.out_proj(kind)
    columns = kept_columns(adapter, masks, sublayer)
    k, d = columns.numel(), proj.out_features
    gram = torch.zeros(k, k, dtype=torch.float64, device=proj.weight.device)
    rhs = torch.zeros(k, d, dtype=torch.float64, device=proj.weight.device)
    bias = proj.bias.detach() if proj.bias is not None else 0.0
    for batch, target in zip(batches, teacher_sums):
        x, a = sublayer_activations(model, adapter, masks, batch, sublayer)
        a = a[:, columns].double()  # (tokens, k)
        residual = (target - x - bias).double()  # (tokens, d)
        gram += a.T @ a
        rhs += a.T @ residual
    return NormalEquations(gram, rhs, columns)


def kpwt(model: PreTrainedModel, adapter: ModelAdapter, masks: Masks, batches: Sequence[DistillBatch],
         teacher_sums: Sequence[torch.Tensor], sublayer: int, ridge: float = KPWT_RIDGE) -> list[str]:
    """Re-fit the survivors' output-projection columns of ``sublayer`` in place.

    Returns notes for the report: empty on a clean solve, one line when the ridge had to grow
    or when every attempt failed (the sub-layer is then left untuned).
    """
    system = normal_equations(model, adapter, masks, batches, teacher_sums, sublayer)
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
