"""Random pruning under the FLOPs budget: the floor any informed method must beat.

Every head and neuron gets a score drawn uniformly from ``[0, 1)`` by a ``torch.Generator``
seeded with ``seed`` (the run's seed), in sub-layer order; the kept set is chosen by the same
budgeted threshold as K-prune's KPMS. The same seed gives the same masks on any device.
"""

from __future__ import annotations

import time

import torch

from kprune_cli.pruners.base import PruneProblem, PruneResult
from kprune_cli.pruners.common import keep_masks
from kprune_cli.pruners.common.kpms import kpms


class RandomPruner:
    """Keep units in a seeded random order until the FLOPs budget is spent."""

    name = "random"
    needs_labels = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def prune(self, problem: PruneProblem) -> PruneResult:
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(self.seed)
        scores = {}
        for layer, parts in enumerate(problem.adapter.layers()):
            scores[2 * layer] = torch.rand(parts.num_heads, generator=generator, dtype=torch.float64)
            scores[2 * layer + 1] = torch.rand(parts.num_neurons, generator=generator, dtype=torch.float64)
        keep = kpms(scores, problem.cost, problem.budget)
        masks = keep_masks(problem.adapter, keep, problem.device)
        return PruneResult(masks=masks, timing={"search": time.perf_counter() - start})
