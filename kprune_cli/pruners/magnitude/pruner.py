"""Weight-magnitude pruning under the FLOPs budget: the simplest honest baseline.

A unit's importance is the total squared weight it owns (its Q/K/V rows and output-projection
columns for a head; its input row and output column for a neuron), divided by its FLOPs (both
grow with the unit's weight count, so heads and neurons compete on equal terms); the
kept set is chosen globally over all sub-layers by the same budgeted threshold as K-prune's
KPMS. No data, no gradients, no weight-tuning.
"""

from __future__ import annotations

import time

import torch

from kprune_cli.models.adapters import LayerParts
from kprune_cli.models.masks import Masks
from kprune_cli.pruners.base import PruneProblem, PruneResult
from kprune_cli.pruners.common import sublayer_kind, sublayer_parts, unit_width
from kprune_cli.pruners.common.kpms import kpms


def unit_magnitudes(parts: LayerParts, kind: str) -> torch.Tensor:
    """Total squared weight per unit: ``(heads,)`` for ``"mha"``, ``(neurons,)`` for ``"ffn"``.

    A unit owns its rows of every input projection (Q/K/V, or a fused QKV's three blocks; a
    neuron's input row, or its value and gate rows) and its columns of the output projection.
    """
    proj = parts.out_proj(kind)
    width = unit_width(parts, kind)
    units = proj.in_features // width
    total = proj.weight.pow(2).sum(dim=0).view(units, width).sum(dim=1)  # (units,)
    for linear, blocks in parts.unit_inputs(kind):
        rows = linear.weight.pow(2).sum(dim=1)  # (blocks * units * width,)
        total = total + rows.view(blocks, units, width).sum(dim=(0, 2))
    return total


class MagnitudePruner:
    """Keep the units with the largest weights per FLOP within the budget."""

    name = "magnitude"
    needs_labels = False

    @torch.no_grad()
    def prune(self, problem: PruneProblem) -> PruneResult:
        start = time.perf_counter()
        num_sublayers = 2 * problem.adapter.num_layers
        scores = {}
        for s in range(num_sublayers):
            parts, kind = sublayer_parts(problem.adapter, s)
            scores[s] = unit_magnitudes(parts, kind).double() / problem.cost.cost(kind)
        keep = kpms(scores, problem.cost, problem.budget)
        masks = Masks.ones(problem.adapter, problem.device)
        for s in range(num_sublayers):
            masks.of(sublayer_kind(s))[s // 2] = keep[s].to(masks.heads[0].dtype)
        return PruneResult(masks=masks, timing={"search": time.perf_counter() - start})
