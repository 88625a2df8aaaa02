"""Compensation-aware selection of a sub-layer's survivors (the opt-in ``pruner.selection=reconstruction``).

KPMS (:mod:`~kprune_cli.pruners.common.kpms`) still decides *how many* units sub-layer ``s`` keeps;
this module decides *which*, by the reconstruction error left after KPWT's re-fit, keeping
predictive knowledge in the loop through the **bottom-2× candidate rule**: with ``r`` units to
remove, only the ``2r`` lowest-scored alive units in KPMS's order (score descending, ties by
position, so the later of equally scored units ranks lower) are candidates, and
:func:`~kprune_cli.pruners.common.obs_selection.greedy_removal` removes ``r`` of them one at a time,
each the one whose removal raises the ridge least-squares error least after the optimal re-fit of
all the others (ties: lowest unit index). The system is KPWT's over all alive units of ``s``
(its mask not yet written), with KPWT's ridge and prior; centred when ``affine``. Its final
solution is KPWT's for the survivors, written in place of a separate KPWT solve.

Guards: nothing to remove or nothing kept need no choice beyond the count; when the initial
solve or a removal step fails numerically, the sub-layer falls back to the score selection and
plain KPWT, with a note.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedModel

from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.masks import Masks
from kprune_cli.pruners.common import sublayer_parts, unit_width
from kprune_cli.pruners.common.obs_selection import greedy_removal
from kprune_cli.pruners.common.reconstruction import normal_equations
from kprune_cli.pruners.common.teacher import DistillBatch
from kprune_cli.pruners.kprune.tune import KPWT_RIDGE, fit_system, kpwt, write_fit

CANDIDATE_FACTOR = 2
"""Candidates per unit to remove: the bottom ``CANDIDATE_FACTOR · r`` of the sub-layer by score."""


def candidates(scores: torch.Tensor, alive: torch.Tensor, remove: int) -> torch.Tensor:
    """The bottom-2× candidates ``(min(2r, alive),)`` (unit indices, ascending) of a sub-layer with
    ``scores`` ``(units,)`` and ``alive`` ``(units,)`` bool, ``remove`` = ``r`` units to remove."""
    order = torch.argsort(scores.double(), descending=True, stable=True)  # KPMS's order
    ranked = order[alive[order]]
    return ranked[max(len(ranked) - CANDIDATE_FACTOR * remove, 0):].sort().values


def select_and_tune(model: PreTrainedModel, adapter: ModelAdapter, masks: Masks, batches: Sequence[DistillBatch],
                    teacher_sums: Sequence[torch.Tensor], sublayer: int, scores: torch.Tensor, keep: int,
                    hidden: Sequence[torch.Tensor] | None = None, affine: bool = False,
                    ridge: float = KPWT_RIDGE, precision: str = "float64") -> list[str]:
    """Choose which ``keep`` alive units of ``sublayer`` survive, write its mask, and tune it.

    ``scores`` ``(units,)``: the sub-layer's KPMS scores (``-inf`` for pruned units); ``masks``:
    the current masks, the sub-layer's not yet decided (its alive units are its non-zero entries).
    Other arguments as in :func:`~kprune_cli.pruners.kprune.tune.kpwt`. Returns notes for the report.
    """
    parts, kind = sublayer_parts(adapter, sublayer)
    mask = masks.of(kind)[sublayer // 2]
    alive = mask != 0
    remove = int(alive.sum()) - keep
    scores = scores.to(mask.device)
    pool = candidates(scores, alive, remove)
    where = f"selection sub-layer {sublayer} ({kind.upper()} of layer {sublayer // 2})"
    if remove == 0 or keep == 0:  # the count alone decides
        mask[pool[:remove]] = 0
        return kpwt(model, adapter, masks, batches, teacher_sums, sublayer, ridge, hidden, precision, affine).notes
    system = normal_equations(model, adapter, masks, batches, teacher_sums, sublayer, hidden, precision)
    proj = parts.out_proj(kind)
    affine = affine and proj.bias is not None
    gram, rhs = fit_system(system, affine)
    units = alive.nonzero().squeeze(1)  # (n,): alive unit indices, the system's unit order
    local = torch.searchsorted(units, pool.to(units.device))  # candidates as positions among the alive
    width = unit_width(parts, kind)
    prior = proj.weight.detach()[:, system.columns].T  # (n·w, d)
    removal = greedy_removal(gram, rhs, prior, width, local, remove, ridge)
    if removal.solution is None:
        note = (f"{where}: the compensation-aware removal failed numerically (relative ridge "
                f"{removal.ridge:g}); kept the top-scored units and tuned them plainly")
        mask[torch.argsort(scores.double(), descending=True, stable=True)[keep:]] = 0  # KPMS's choice
        return [note] + kpwt(model, adapter, masks, batches, teacher_sums, sublayer, ridge, hidden, precision,
                             affine).notes
    kept_units = torch.ones(len(units), dtype=torch.bool, device=units.device)
    kept_units[removal.removed] = False
    mask[units[~kept_units]] = 0
    write_fit(proj, system, kept_units.repeat_interleave(width).to(system.columns.device), removal.solution, affine)
    if removal.attempts > 1:
        return [f"{where}: solved only with relative ridge {removal.ridge:g} "
                f"({removal.attempts - 1} fallback(s) from {ridge:g})"]
    return []
