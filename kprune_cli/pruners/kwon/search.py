"""FLOPs-constrained mask search (Kwon et al., step b).

Heads and neurons are ranked globally (across layers) by their Fisher importance, each kind on
its own. For every possible number ``h`` of kept heads, the ``h`` most important heads are kept
and the rest of the budget is filled with the most important neurons,
``n(h) = ⌊(budget − h·F_head) / F_neuron⌋`` (at most all of them); the split that keeps the most
importance ``Σ top-h heads + Σ top-n(h) neurons`` wins (equivalently: the least pruned
importance). All splits are scored at once from cumulative sums: O(n log n) for the sorts.

Since a head costs the same everywhere and so does a neuron, this is the exact optimum of "keep
the most importance within the budget" for non-negative importance (a knapsack with two item
sizes). Ties between splits go to the fewest heads, as the official loop's strict ``>`` does.

Differences from the official code: the constraint is ours, the fraction of FLOPs *removed*
(``rate``), through :class:`~kprune_cli.models.flops.FlopsModel` (``F_head``, ``F_neuron``), where theirs is
the fraction of MACs *kept*; ``h`` runs from 0 (theirs from 1).
"""

from __future__ import annotations

from typing import Mapping

import torch

from kprune_cli.models.flops import FlopsModel
from kprune_cli.pruners.common import sublayer_kind
from kprune_cli.pruners.common.kpms import BUDGET_TOLERANCE


def search_masks(importance: Mapping[int, torch.Tensor], flops: FlopsModel,
                 budget: float) -> dict[int, torch.Tensor]:
    """Keep-masks ``(units_s,)`` bool for every sub-layer in ``importance`` within ``budget`` FLOPs.

    ``importance[s]``: non-negative importance of the units of sub-layer ``s``.
    """
    if budget < 0:
        raise ValueError(f"negative FLOPs budget {budget}")
    by_kind, ranking = {}, {}
    for kind in ("mha", "ffn"):
        by_kind[kind] = [s for s in sorted(importance) if sublayer_kind(s) == kind]
        values = torch.cat([importance[s].double().cpu() for s in by_kind[kind]])  # (units of this kind,)
        if torch.isnan(values).any():
            raise ValueError("the mask search got NaN importance (the model produced non-finite gradients)")
        order = torch.argsort(values, descending=True, stable=True)
        ranking[kind] = (order, torch.cat([values.new_zeros(1), values[order].cumsum(dim=0)]))  # (u,), (u + 1,)

    (head_order, head_prefix), (neuron_order, neuron_prefix) = ranking["mha"], ranking["ffn"]
    num_heads = torch.arange(head_order.numel() + 1, dtype=torch.float64)  # (H + 1,)
    room = budget * (1 + BUDGET_TOLERANCE) - num_heads * flops.head
    num_neurons = torch.floor(room / flops.neuron).clamp(max=neuron_order.numel())  # (H + 1,), < 0: infeasible
    kept = head_prefix + neuron_prefix[num_neurons.clamp(min=0).long()]
    kept = torch.where(num_neurons >= 0, kept, torch.full_like(kept, float("-inf")))
    best = int(torch.argmax(kept))  # the first maximum: the fewest heads among ties

    keep = {}
    for kind, count in (("mha", best), ("ffn", int(num_neurons[best]))):
        order = ranking[kind][0]
        flat = torch.zeros(order.numel(), dtype=torch.bool)
        flat[order[:count]] = True
        sizes = [importance[s].numel() for s in by_kind[kind]]
        keep.update({s: mask.to(importance[s].device) for s, mask in zip(by_kind[kind], flat.split(sizes))})
    return keep
