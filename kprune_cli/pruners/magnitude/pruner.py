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
from kprune_cli.pruners.common import sublayer_kind, sublayer_parts
from kprune_cli.pruners.kprune.search import kpms


def unit_magnitudes(parts: LayerParts, kind: str) -> torch.Tensor:
    """Total squared weight per unit: ``(heads,)`` for ``"mha"``, ``(neurons,)`` for ``"ffn"``."""
    if kind == "mha":
        width = parts.head_size
        rows = torch.cat([parts.query.weight, parts.key.weight, parts.value.weight], dim=1)  # (H*d_h, 3d)
        owned = torch.cat([rows, parts.attn_out.weight.T], dim=1)  # (H*d_h, 4d)
        return owned.pow(2).reshape(parts.num_heads, width * owned.shape[1]).sum(dim=1)
    owned = torch.cat([parts.ffn_in.weight, parts.ffn_out.weight.T], dim=1)  # (N, 2d)
    return owned.pow(2).sum(dim=1)


class MagnitudePruner:
    """Keep the units with the largest weights per FLOP within the budget."""

    name = "magnitude"

    @torch.no_grad()
    def prune(self, problem: PruneProblem) -> PruneResult:
        start = time.perf_counter()
        num_sublayers = 2 * problem.adapter.num_layers
        scores = {}
        for s in range(num_sublayers):
            parts, kind = sublayer_parts(problem.adapter, s)
            scores[s] = unit_magnitudes(parts, kind).double() / problem.flops.cost(kind)
        keep = kpms(scores, problem.flops, problem.budget)
        masks = Masks.ones(problem.adapter, problem.device)
        for s in range(num_sublayers):
            masks.of(sublayer_kind(s))[s // 2] = keep[s].to(masks.heads[0].dtype)
        return PruneResult(masks=masks, timing={"search": time.perf_counter() - start})
