"""Kwon et al.'s mask searches (step b): under a FLOPs budget, or under a latency budget.

**FLOPs** (:func:`search_masks`). Heads and neurons are ranked globally (across layers) by their
Fisher importance, each kind on its own. For every possible number ``h`` of kept heads, the ``h``
most important heads are kept and the rest of the budget is filled with the most important neurons,
``n(h) = ⌊(budget − h·F_head) / F_neuron⌋`` (at most all of them); the split that keeps the most
importance ``Σ top-h heads + Σ top-n(h) neurons`` wins (equivalently: the least pruned
importance). All splits are scored at once from cumulative sums: O(n log n) for the sorts.

Since a head costs the same everywhere and so does a neuron, this is the exact optimum of "keep
the most importance within the budget" for non-negative importance (a knapsack with two item
sizes). Ties between splits go to the fewest heads, as the official loop's strict ``>`` does.

Differences from the official code: the constraint is ours, the fraction of FLOPs *removed*
(``rate``), through :class:`~kprune_cli.models.flops.FlopsModel` (``F_head``, ``F_neuron``), where theirs is
the fraction of MACs *kept*; ``h`` runs from 0 (theirs from 1).

**Latency** (:func:`search_latency_masks`, their ``search_latency``). A lookup table gives the
latency of one MHA sub-layer with ``h`` heads and of one FFN sub-layer with ``n`` neurons.
:func:`fit_piecewise_linear` fits each table as a constant ``c`` up to ``threshold`` units and
``c + slope·(width − threshold)`` beyond (their ``fit_latency_fn``). The search then works on that
model: every sub-layer is kept with at least its ``threshold`` locally most important units (its
*base*, cost ``c``) or emptied (cost 0). Sub-layers are emptied in the order of least base
importance, ``d_mha`` MHA and ``d_ffn`` FFN sub-layers; the units beyond the base of the kept
sub-layers are ranked globally per kind, and for each number of these extra heads, the rest of the
budget buys extra neurons at ``slope`` each, as in the FLOPs search. The configuration
``(d_mha, d_ffn, heads)`` that keeps the most importance wins.

Deviations from the official ``search_latency``, each a defect there:

1. *Cumulative budget.* Their loop subtracts the kept sub-layers' base cost from ``max_latency``
   inside the nested drop loop, so every configuration sees the budget left over by all earlier
   ones; after the first few the budget is negative and the configurations with more emptied
   sub-layers, often the best ones, are skipped (if the undropped one does not fit, none is
   considered and their code fails). Here each configuration's budget is the full budget minus its
   own base cost.
2. *Base importance not counted.* Their objective is the importance of the extra units only; with
   (1) fixed it would favour emptying sub-layers, whose base units then cost nothing in the score.
   Here the kept sub-layers' base importance is added: configurations compare on the total kept
   importance.
3. *Emptying every sub-layer of a kind.* Their drop counts run to ``L − 1``; here to ``L``, so the
   all-emptied configuration (cost 0) is always feasible: a budget below every non-empty choice
   empties every sub-layer instead of failing.
4. *Zero extra heads.* Their head count starts at 1 (none is considered when ``threshold = H``);
   here at 0. A negative neuron count ends their head loop (``break``); here it marks that head
   count infeasible, the same thing, since fewer neurons fit as heads are added. A zero FFN
   ``slope`` (their division by zero) makes the extra neurons free: all of them fit.
5. Only the kept sub-layers' extra units are ranked (theirs also ranks the emptied sub-layers'
   extra units, with importance zeroed, and may keep some).
6. Their fit starts from a least squared error of 10000, so a table in large units (µs) can get no
   fit at all; ours from infinity.

The budget binds the fitted latencies, as theirs does: where a table is not exactly piecewise
linear, the table's own sum at the chosen widths differs by the fit's residuals there.

Ties, all deterministic: units of a sub-layer by index, sub-layers to empty by position (the
earlier first), extra units by (sub-layer, local rank), and configurations to the fewest emptied
MHA, then FFN sub-layers, then the fewest extra heads (a strict ``>``, as theirs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class PiecewiseLinear:
    """A sub-layer's latency with ``w ≥ 1`` units: ``constant`` for ``w ≤ threshold``, then
    ``constant + slope·(w − threshold)``."""

    threshold: int
    constant: float
    slope: float


def fit_piecewise_linear(latency: Sequence[float]) -> PiecewiseLinear:
    """The least-squares :class:`PiecewiseLinear` for ``latency[w − 1]``, the latency with ``w = 1..W`` units.

    For each threshold ``t`` the constant is the mean of the first ``t`` entries and the slope the
    least-squares slope of the rest through ``(t, constant)``, clipped at 0 (0 when ``t = W``); the
    threshold with the least squared error wins, the smallest among ties.
    """
    table = torch.as_tensor(latency, dtype=torch.float64)  # (W,)
    if table.ndim != 1 or table.numel() == 0 or not torch.isfinite(table).all():
        raise ValueError(f"a latency table must be a non-empty sequence of finite numbers, got {latency!r}")
    width = table.numel()
    best, least_error = None, math.inf
    for threshold in range(1, width + 1):
        constant = table[:threshold].mean()
        excess = table[threshold:] - constant  # (W − t,)
        steps = torch.arange(1, width - threshold + 1, dtype=torch.float64)  # (W − t,)
        slope = (steps @ excess / (steps @ steps)).clamp(min=0) if threshold < width else table.new_zeros(())
        error = float(((table[:threshold] - constant) ** 2).sum() + ((excess - slope * steps) ** 2).sum())
        if error < least_error:
            best, least_error = PiecewiseLinear(threshold, float(constant), float(slope)), error
    return best


@dataclass(frozen=True)
class _Ranking:
    """One kind's ``L`` sub-layers of ``U`` units ranked for the latency search (``t`` = the fit's threshold)."""

    sublayers: list[int]  # (L,) sub-layer ids, ascending
    fit: PiecewiseLinear
    local_order: torch.Tensor  # (L, U) unit indices of each sub-layer, most important first
    extra_values: torch.Tensor  # (L·(U − t),) importance of the units beyond the base, row-major by (sub-layer, rank)
    extra_order: torch.Tensor  # (L·(U − t),) positions in extra_values, most important first
    drop_position: torch.Tensor  # (L,) each sub-layer's place in the order of emptying (least base importance first)
    kept_base: torch.Tensor  # (L + 1,) base importance of the sub-layers kept when the first d are emptied

    def kept_extras(self, drops: int) -> torch.Tensor:
        """``(R_d,)`` positions in ``extra_values`` of the kept sub-layers' extra units, most important first."""
        extras = self.local_order.shape[1] - self.fit.threshold
        return self.extra_order[self.drop_position[self.extra_order // extras] >= drops] if extras else self.extra_order

    def extra_prefix(self, drops: int) -> torch.Tensor:
        """``(R_d + 1,)`` importance of the ``k`` best extra units of the kept sub-layers, ``k = 0..R_d``."""
        values = self.extra_values[self.kept_extras(drops)]
        return torch.cat([values.new_zeros(1), values.cumsum(dim=0)])

    def keep(self, drops: int, extras: int) -> dict[int, torch.Tensor]:
        """Keep-masks ``(U,)`` when the first ``drops`` sub-layers are emptied and ``extras`` extra units are kept."""
        count, units = self.local_order.shape
        threshold, mask = self.fit.threshold, torch.zeros(count, units, dtype=torch.bool)  # (L, U)
        kept = self.drop_position >= drops  # (L,)
        mask[kept] = mask[kept].scatter(1, self.local_order[kept, :threshold], True)
        chosen = self.kept_extras(drops)[:extras]
        if extras:
            rows = chosen // (units - threshold)
            mask[rows, self.local_order[rows, threshold + chosen % (units - threshold)]] = True
        return dict(zip(self.sublayers, mask))


def _rank(importance: Mapping[int, torch.Tensor], kind: str, fit: PiecewiseLinear, units: int) -> _Ranking:
    """Rank the sub-layers of ``kind`` (``units`` units each) for the latency search."""
    sublayers = [s for s in sorted(importance) if sublayer_kind(s) == kind]
    if not sublayers:
        raise ValueError(f"the latency search got no {kind.upper()} sub-layer")
    if any(importance[s].numel() != units for s in sublayers):
        raise ValueError(f"every {kind.upper()} sub-layer must have {units} units, as its latency table says")
    values = torch.stack([importance[s].double().cpu().reshape(-1) for s in sublayers])  # (L, U)
    if torch.isnan(values).any():
        raise ValueError("the mask search got NaN importance (the model produced non-finite gradients)")
    local_values, local_order = values.sort(dim=1, descending=True, stable=True)  # (L, U) each
    base = local_values[:, :fit.threshold].sum(dim=1)  # (L,)
    drop_order = torch.argsort(base, stable=True)  # (L,) least base importance first
    drop_position = torch.empty_like(drop_order)
    drop_position[drop_order] = torch.arange(len(sublayers))
    extra_values = local_values[:, fit.threshold:].reshape(-1)
    kept_base = torch.cat([base[drop_order].flip(0).cumsum(dim=0).flip(0), base.new_zeros(1)])  # exactly 0 at d = L
    return _Ranking(sublayers, fit, local_order, extra_values,
                    torch.argsort(extra_values, descending=True, stable=True), drop_position, kept_base)


def _affordable(room: torch.Tensor, slope: float, available: int) -> torch.Tensor:
    """``(k,)`` how many units at ``slope`` each fit in each ``room`` (at most ``available``; −1 if the room is negative)."""
    if slope == 0:
        return torch.where(room >= 0, available, -1)
    return torch.floor(room / slope).clamp(min=-1, max=available).long()


def search_latency_masks(importance: Mapping[int, torch.Tensor], mha_ms: Sequence[float], ffn_ms: Sequence[float],
                         budget_ms: float) -> dict[int, torch.Tensor]:
    """Keep-masks ``(units_s,)`` bool for every sub-layer in ``importance`` within a latency budget.

    ``importance[s]``: importance of the units of sub-layer ``s`` (even ``s``: the MHA of layer
    ``s // 2``, ``H`` heads; odd: its FFN, ``N`` neurons). ``mha_ms[h]``: the latency of one MHA
    sub-layer with ``h = 0..H`` heads, ``ffn_ms[n]`` of one FFN sub-layer with ``n = 0..N`` neurons;
    ``mha_ms[0] = ffn_ms[0] = 0`` when an emptied sub-layer's own time is counted elsewhere (a
    non-zero entry is a fixed cost of every sub-layer of its kind, taken off the budget).
    ``budget_ms``: the budget for the sum over sub-layers of these latencies, as the fitted
    :class:`PiecewiseLinear` models of ``mha_ms[1:]`` and ``ffn_ms[1:]`` predict it. The module
    docstring gives the search and its deviations from the official code.
    """
    if not budget_ms >= 0:
        raise ValueError(f"the latency budget must be a non-negative number, got {budget_ms}")
    rankings, room = {}, budget_ms * (1 + BUDGET_TOLERANCE)
    for kind, table in (("mha", mha_ms), ("ffn", ffn_ms)):
        table = torch.as_tensor(table, dtype=torch.float64)  # (units + 1,)
        if table.ndim != 1 or table.numel() < 2:
            raise ValueError(f"the {kind.upper()} latency table needs the widths 0..units, got shape {tuple(table.shape)}")
        rankings[kind] = _rank(importance, kind, fit_piecewise_linear(table[1:] - table[0]), table.numel() - 1)
        room -= len(rankings[kind].sublayers) * float(table[0])
    heads, neurons = rankings["mha"], rankings["ffn"]

    # Every sub-layer emptied: also a configuration (cost 0), the answer when even it does not fit (room < 0).
    best, best_total = (len(heads.sublayers), len(neurons.sublayers), 0, 0), -math.inf
    neuron_prefixes = [neurons.extra_prefix(d) for d in range(len(neurons.sublayers) + 1)]
    for head_drops in range(len(heads.sublayers) + 1):
        head_prefix = heads.extra_prefix(head_drops)  # (R + 1,)
        head_counts = torch.arange(head_prefix.numel())
        for neuron_drops, neuron_prefix in enumerate(neuron_prefixes):
            base_cost = ((len(heads.sublayers) - head_drops) * heads.fit.constant
                         + (len(neurons.sublayers) - neuron_drops) * neurons.fit.constant)
            if base_cost > room:
                continue
            neuron_counts = _affordable(room - base_cost - head_counts * heads.fit.slope, neurons.fit.slope,
                                        neuron_prefix.numel() - 1)  # (R + 1,)
            total = (heads.kept_base[head_drops] + neurons.kept_base[neuron_drops] + head_prefix
                     + neuron_prefix[neuron_counts.clamp(min=0)])
            total = torch.where(neuron_counts >= 0, total, float("-inf"))
            extra_heads = int(torch.argmax(total))  # the first maximum: the fewest extra heads among ties
            if total[extra_heads] > best_total:
                best_total = float(total[extra_heads])
                best = (head_drops, neuron_drops, extra_heads, int(neuron_counts[extra_heads]))

    head_drops, neuron_drops, extra_heads, extra_neurons = best
    keep = {**heads.keep(head_drops, extra_heads), **neurons.keep(neuron_drops, extra_neurons)}
    return {s: mask.to(importance[s].device) for s, mask in keep.items()}
