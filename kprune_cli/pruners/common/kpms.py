"""Knowledge-preserving mask search, KPMS (K-prune step 2; docs/design.md §3).

Keep the highest-scoring units, across all candidate sub-layers at once, as long as their
FLOPs fit the budget: sort the per-FLOP scores in descending order, take cumulative costs and
cut where the budget is exhausted. The cost model may be a measured latency table instead
(``constraint=latency``, :class:`~kprune_cli.models.latency_table.LatencyCost`): there a unit's
cost depends on how many units its sub-layer already keeps, and since each sub-layer's units come
in the global order by descending score, the ``k``-th unit of a sub-layer in that order costs the
sub-layer's ``k``-th step (its ``unit_costs``). With FLOPs every step is ``F_head`` or
``F_neuron``, which is the paper's search, bit for bit. The kept set is always a *prefix* of the score order (a
threshold on the score), exactly as in the paper and the official code; it is not a knapsack
that skips an expensive unit to fit cheaper, lower-scoring ones. O(n log n).

With a latency table, a sub-layer's count is then cut down to the largest width the table timed
(:meth:`~kprune_cli.models.latency_table.LatencyCost.priced_width`: FFN widths every
``latency.ffn_step`` neurons; runtimes are slower between them than the interpolation says), dropping its
lowest-scored survivors; the budget they leave goes to the sub-layers searched later. With FLOPs every
width is priced and nothing is cut.

Ties are broken by position (stable sort: earlier sub-layer, lower index first); the official
code keeps or drops tied units together.

The search runs on the CPU whatever the scores' device (at most some 10^5 values): the same
result on every device, and no float ``cumsum`` on CUDA, which raises under
``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

from typing import Mapping

import torch

from kprune_cli.models.flops import CostModel
from kprune_cli.pruners.common import sublayer_kind

BUDGET_TOLERANCE = 1e-9
"""Relative slack on the budget, so that float rounding of the cumulative sum never drops a unit
at rate 0."""


def kpms(scores: Mapping[int, torch.Tensor], cost: CostModel, budget: float) -> dict[int, torch.Tensor]:
    """Keep-masks ``(units,)`` bool for every sub-layer in ``scores`` within ``budget`` (FLOPs, or
    milliseconds with a latency cost).

    Units scored ``-inf`` (already pruned) are never kept and cost nothing. The masks are on the
    scores' device.
    """
    sublayers = sorted(scores)
    values = torch.cat([scores[s].double().cpu() for s in sublayers])  # (n,)
    if torch.isnan(values).any():
        raise ValueError("KPMS got NaN importance scores (the model produced non-finite outputs)")
    costs = torch.cat([in_score_order(scores[s], cost.unit_costs(sublayer_kind(s), scores[s].numel()))
                       for s in sublayers])  # (n,)
    order = torch.argsort(values, descending=True, stable=True)
    alive = torch.isfinite(values[order])  # a prefix of ``order``
    spent = torch.cumsum(costs[order] * alive, dim=0)
    fits = alive & (spent <= budget + BUDGET_TOLERANCE * abs(budget))  # a prefix as well
    keep = torch.zeros_like(values, dtype=torch.bool)
    keep[order[: int(fits.sum())]] = True
    pieces = keep.split([scores[s].numel() for s in sublayers])
    found = {}
    for s, piece in zip(sublayers, pieces):
        kept = int(piece.sum())
        surplus = kept - cost.priced_width(sublayer_kind(s), kept)
        found[s] = (drop_lowest(piece, scores[s].cpu(), surplus) if surplus else piece).to(scores[s].device)
    return found


def in_score_order(scores: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``(units,)``: ``steps[k]`` (the cost of a sub-layer's ``k+1``-th kept unit) given to the unit
    ranked ``k`` in the sub-layer by ``scores`` ``(units,)`` (descending; ties: lower index first, as
    in KPMS's global order)."""
    placed = torch.empty_like(steps)
    placed[torch.argsort(scores.double().cpu(), descending=True, stable=True)] = steps
    return placed


def align_kept(keep: torch.Tensor, scores: torch.Tensor, multiple: int) -> torch.Tensor:
    """``keep`` ``(units,)`` bool with its lowest-scoring kept units dropped until the count is a
    multiple of ``multiple`` (rounded down, so the FLOPs stay within any budget ``keep`` met).
    Tensor-core GEMMs run fastest on widths that are multiples of 8 (or 64)."""
    return drop_lowest(keep, scores, int(keep.sum()) % multiple)


def drop_lowest(keep: torch.Tensor, scores: torch.Tensor, count: int) -> torch.Tensor:
    """``keep`` ``(units,)`` bool without its ``count`` lowest-scoring kept units (ties: the lower
    index goes first); ``keep`` itself when ``count`` is 0."""
    if count == 0:
        return keep
    kept = keep.nonzero().squeeze(1)  # (kept,)
    order = torch.argsort(scores[kept].double(), stable=True)  # lowest first; ties: lower index first
    dropped = keep.clone()
    dropped[kept[order[:count]]] = False
    return dropped
