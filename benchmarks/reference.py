"""The reference K-prune schedule that the fast one is measured and checked against.

It is the straightforward reading of the paper, as this project first implemented it: every
pass starts at the embeddings (each of the 2L measurement passes, and one more forward pass per
sub-layer for KPWT's normal equations), the teacher's residual sums come from one truncated pass
of a frozen copy per layer, and KPMS scans the candidate thresholds one by one, re-summing the
kept units' costs for each (O(n²), as the official code does). It must choose the same masks and
tuned weights (up to float round-off) as :class:`~kprune_cli.pruners.kprune.pruner.KPrunePruner`
with the same settings; the benchmark and the tests assert it. Iterative schedule only.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from transformers import PreTrainedModel

from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.flops import FlopsModel
from kprune_cli.models.masks import Masks
from kprune_cli.models.precision import AUTOCAST_DTYPES
from kprune_cli.pruners.base import PruneProblem, PruneResult
from kprune_cli.pruners.common import sublayer_kind
from kprune_cli.pruners.common.hooks import capture_taps, forward_until
from kprune_cli.pruners.common.kpms import BUDGET_TOLERANCE
from kprune_cli.pruners.common.teacher import DistillBatch, Teacher
from kprune_cli.pruners.kprune.measure import measure, score
from kprune_cli.pruners.kprune.pruner import KPrunePruner
from kprune_cli.pruners.kprune.tune import kpwt
from kprune_cli.runtime.precision import full_float32
from kprune_cli.runtime.timing import timed


def kpms_scan(scores: Mapping[int, torch.Tensor], flops: FlopsModel, budget: float) -> dict[int, torch.Tensor]:
    """KPMS by scanning candidate cuts: for ``k = 1, 2, ...`` re-sum the costs of the ``k`` best
    units and stop at the first ``k`` over the budget. Same result as
    :func:`~kprune_cli.pruners.common.kpms.kpms` (same order and tie-breaking), in O(n²)."""
    sublayers = sorted(scores)
    values = torch.cat([scores[s].double() for s in sublayers])  # (n,)
    costs = torch.cat([torch.full_like(scores[s], flops.cost(sublayer_kind(s)), dtype=torch.float64)
                       for s in sublayers])  # (n,)
    order = torch.argsort(values, descending=True, stable=True)
    alive = int(torch.isfinite(values).sum())
    kept = 0
    while kept < alive and float(costs[order[:kept + 1]].sum()) <= budget + BUDGET_TOLERANCE * abs(budget):
        kept += 1
    keep = torch.zeros_like(values, dtype=torch.bool)
    keep[order[:kept]] = True
    return dict(zip(sublayers, keep.split([scores[s].numel() for s in sublayers])))


@torch.no_grad()
def truncated_teacher_sums(original: PreTrainedModel, batches: list[DistillBatch], layer: int
                           ) -> dict[str, list[torch.Tensor]]:
    """Per batch, ``layer``'s residual sums ``(tokens_b, d)`` by kind, from a pass of ``original``
    from the embeddings truncated after the layer."""
    parts = get_adapter(original).layers()[layer]
    sums: dict[str, list[torch.Tensor]] = {"mha": [], "ffn": []}
    for batch in batches:
        with capture_taps({kind: parts.sum_tap(kind) for kind in sums}) as store:
            forward_until(original, batch.inputs, parts.sum_tap("ffn"))
        for kind, values in sums.items():
            values.append(store[kind][batch.token_mask])
    return sums


class ReferenceKPrune:
    """The reference schedule with the settings of ``pruner`` (which must be iterative)."""

    name = "kprune-reference"

    def __init__(self, pruner: KPrunePruner) -> None:
        if not pruner.iterative:
            raise ValueError("the reference schedule is the iterative one")
        self.pruner = pruner

    @full_float32()
    def prune(self, problem: PruneProblem) -> PruneResult:
        p = self.pruner
        timing = {"teacher": 0.0, "measure": 0.0, "search": 0.0, "tune": 0.0}
        with timed(timing, "teacher"):
            teacher = Teacher(problem.model, problem.task.kind, problem.sample, p.temperature, p.micro_batch_size,
                              problem.device, keep_model=False)
            original = copy.deepcopy(problem.model).eval() if p.tune else None
        masks = Masks.ones(problem.adapter, problem.device)
        notes: list[str] = []
        budget = problem.budget
        sums: dict[str, list[torch.Tensor]] = {}
        for s in range(2 * problem.adapter.num_layers):
            kind, layer = sublayer_kind(s), s // 2
            with timed(timing, "measure"):
                knowledge = measure(problem.model, problem.adapter, masks, teacher, s,
                                    autocast=AUTOCAST_DTYPES.get(p.autocast), gradient_batch=p.gradient_batch_of(problem))
            with timed(timing, "search"):
                scores = score(knowledge, masks, problem.flops, p.lambda_pred, p.lambda_rep, p.mu)
                masks.of(kind)[layer] = kpms_scan(scores, problem.flops, budget)[s].to(masks.heads[0].dtype)
            budget -= float(masks.of(kind)[layer].count_nonzero()) * problem.flops.cost(kind)
            if original is not None:
                if kind == "mha":
                    with timed(timing, "teacher"):
                        sums = truncated_teacher_sums(original, teacher.batches, layer)
                with timed(timing, "tune"):
                    notes += kpwt(problem.model, problem.adapter, masks, teacher.batches, sums[kind], s).notes
        return PruneResult(masks=masks, notes=notes, timing=timing)
