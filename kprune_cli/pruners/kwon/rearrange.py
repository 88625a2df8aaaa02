"""Mask rearrangement with the block-diagonal Fisher (Kwon et al., step c).

The search ranks units by the *diagonal* Fisher, as if pruning one unit did not change the
importance of another. Within one sub-layer (one block of the Fisher: the heads of a layer, or
its neurons) the interactions are kept: to second order, pruning the set ``P`` raises the loss by

    Σ_b (Σ_{i∈P} g_{b,i})² = (1 − m)ᵀ F (1 − m),   F = Σ_b g_b g_bᵀ

with ``g_b`` the per-batch mask gradients. Keeping the number of pruned units of the sub-layer
fixed, the official greedy ``greedy_rearrange`` lowers this: starting from the pruned set, it
visits the kept units in increasing diagonal Fisher; each visit adds the unit to the pruned set
and then takes out the member whose removal leaves the smallest ``‖Σ_{i∈P} g_i‖²`` (possibly the
unit just added, which undoes the visit). So the objective never rises, and the counts hold.

Difference from the official code: the greedy starts from the pruned set it is given (the
search's); theirs restarts from the sub-layer's lowest-Fisher units, the same set unless there
are ties. The removal picks the argmin of ``‖g_j‖² − 2·g_j·S`` over the members (``S`` the sum
over the enlarged set), which equals theirs, ``argmin ‖S − g_j‖²``, without copying the members'
gradients at every step; on a tie the unit just added goes back out (theirs takes the earliest
member), so units are only swapped when that strictly lowers the objective.
"""

from __future__ import annotations

import torch


def pruned_loss(keep: torch.Tensor, grads: torch.Tensor) -> float:
    """The objective ``Σ_b (Σ_{i pruned} g_{b,i})²``; ``keep`` ``(units,)`` bool, ``grads`` ``(batches, units)``."""
    return float(grads.double()[:, ~keep].sum(dim=1).pow(2).sum())


@torch.no_grad()
def rearrange_units(keep: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """A keep-mask ``(units,)`` bool with as many kept units as ``keep`` and no larger :func:`pruned_loss`.

    ``grads``: the per-batch mask gradients of this sub-layer's units, ``(batches, units)``.
    """
    num_pruned = int((~keep).sum())
    if num_pruned in (0, keep.numel()):
        return keep.clone()
    vectors = grads.T.double().cpu()  # (units, batches)
    norms = vectors.pow(2).sum(dim=1)  # (units,): the diagonal Fisher
    member = ~keep.cpu()  # the pruned set P
    total = vectors[member].sum(dim=0)  # (batches,): Σ_{i∈P} g_i
    kept = keep.cpu().nonzero().squeeze(1)
    for unit in kept[torch.argsort(norms[kept], stable=True)].tolist():
        member[unit] = True
        total += vectors[unit]
        # ‖S − g_j‖² − ‖S‖² for every member j of the enlarged set
        change = torch.where(member, norms - 2 * (vectors @ total), torch.full_like(norms, float("inf")))
        out = unit if change[unit] <= change.min() else int(torch.argmin(change))
        member[out] = False
        total -= vectors[out]
    return (~member).to(keep.device)
