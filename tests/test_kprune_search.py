"""KPMS against an exhaustive reference, and its budget guarantees.

The reference enumerates every subset of ≤ 10 units and keeps, among those that fit the budget
and are *threshold sets* (no dropped unit outranks a kept one), the largest. That is the paper's
rule (a threshold on the sorted per-FLOP scores), so it must coincide with the vectorised
prefix cut. It is deliberately not the 0/1-knapsack optimum, which may skip an expensive
high-scoring head to fit cheaper neurons: K-prune does not do that.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from kprune_helpers import DEVICES, TINY_FLOPS

from kprune_cli.models.flops import FlopsModel
from kprune_cli.pruners.common.kpms import align_kept, kpms


def _random_instance(generator: torch.Generator, max_units: int = 10):
    """Scores of sub-layers 2..4 (heads, neurons, heads) with random sizes and some pruned (-inf) units."""
    scores = {}
    for sublayer in (2, 3, 4):
        size = int(torch.randint(1, 4, (1,), generator=generator))
        values = torch.rand(size, generator=generator, dtype=torch.float64)
        values[torch.rand(size, generator=generator) < 0.2] = float("-inf")
        scores[sublayer] = values
    return scores


def _flat(scores):
    units = []
    for sublayer in sorted(scores):
        cost = TINY_FLOPS.cost("mha" if sublayer % 2 == 0 else "ffn")
        units += [(sublayer, index, float(value), cost) for index, value in enumerate(scores[sublayer])]
    return units


def _reference(scores, budget: float) -> set[tuple[int, int]]:
    units = [unit for unit in _flat(scores) if unit[2] != float("-inf")]
    best: set[tuple[int, int]] = set()
    for size in range(len(units) + 1):
        for subset in itertools.combinations(units, size):
            kept = {(s, i) for s, i, _, _ in subset}
            dropped = [unit for unit in units if (unit[0], unit[1]) not in kept]
            threshold_set = all(k[2] > d[2] for k in subset for d in dropped)
            if threshold_set and sum(unit[3] for unit in subset) <= budget and len(kept) >= len(best):
                best = kept
    return best


def test_kpms_matches_exhaustive_threshold_search():
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(150):
        scores = _random_instance(generator)
        total = sum(cost for *_, value, cost in _flat(scores) if value != float("-inf"))
        budget = float(torch.rand(1, generator=generator)) * total
        keep = kpms(scores, TINY_FLOPS, budget)
        got = {(s, i) for s, mask in keep.items() for i in mask.nonzero().flatten().tolist()}
        assert got == _reference(scores, budget)
        checked += bool(got)
    assert checked > 50  # the instances are not trivially empty


def test_kpms_respects_budget_and_fills_it_to_within_one_unit():
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        scores = {s: torch.rand(int(torch.randint(1, 40, (1,), generator=generator)), generator=generator,
                                dtype=torch.float64) for s in range(3, 8)}
        costs = {s: TINY_FLOPS.cost("mha" if s % 2 == 0 else "ffn") for s in scores}
        total = sum(costs[s] * scores[s].numel() for s in scores)
        budget = float(torch.rand(1, generator=generator)) * total
        keep = kpms(scores, TINY_FLOPS, budget)
        spent = sum(costs[s] * float(keep[s].sum()) for s in scores)
        assert spent <= budget
        dropped = [(float(scores[s][i]), costs[s]) for s in scores for i in (~keep[s]).nonzero().flatten().tolist()]
        if dropped:
            best_dropped_cost = max(dropped)[1]  # the next unit in score order did not fit
            assert budget - spent < best_dropped_cost


def test_kpms_never_keeps_pruned_units_and_they_cost_nothing():
    scores = {0: torch.tensor([float("-inf"), 5.0, float("-inf"), 4.0], dtype=torch.float64),
              1: torch.full((64,), float("-inf"), dtype=torch.float64)}
    keep = kpms(scores, TINY_FLOPS, budget=2 * TINY_FLOPS.head)
    assert keep[0].tolist() == [False, True, False, True]
    assert not keep[1].any()


def test_kpms_keeps_everything_at_the_full_budget_despite_rounding():
    # MiniLM at RTE's S: without the tolerance the cumulative sum overshoots the total by rounding.
    flops = FlopsModel(hidden_size=384, head_size=32, seq_len=64.59)
    structure = [{"heads": 12, "neurons": 1536}] * 6
    generator = torch.Generator().manual_seed(2)
    scores = {s: torch.rand(12 if s % 2 == 0 else 1536, generator=generator, dtype=torch.float64) for s in range(12)}
    keep = kpms(scores, flops, flops.total(structure))
    assert all(mask.all() for mask in keep.values())


def test_kpms_rejects_nan_scores():
    with pytest.raises(ValueError, match="NaN"):
        kpms({0: torch.tensor([1.0, float("nan")], dtype=torch.float64)}, TINY_FLOPS, 1e9)


@pytest.mark.parametrize("device", DEVICES)
def test_kpms_runs_under_deterministic_algorithms_and_answers_on_the_scores_device(device):
    generator = torch.Generator().manual_seed(3)
    scores = {s: torch.rand(12 if s % 2 == 0 else 64, generator=generator, dtype=torch.float64) for s in range(4)}
    budget = 0.5 * TINY_FLOPS.total([{"heads": 12, "neurons": 64}] * 2)
    expected = kpms(scores, TINY_FLOPS, budget)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # raising mode: a float cumsum on CUDA would raise here
    try:
        keep = kpms({s: value.to(device) for s, value in scores.items()}, TINY_FLOPS, budget)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(keep[s].device.type == device for s in scores)
    assert all(torch.equal(keep[s].cpu(), expected[s]) for s in scores)
    assert 0 < sum(int(mask.sum()) for mask in expected.values()) < sum(v.numel() for v in scores.values())


def test_align_kept_drops_the_lowest_scoring_survivors_down_to_a_multiple():
    scores = torch.tensor([5.0, 1.0, 3.0, float("-inf"), 2.0, 4.0, 0.5], dtype=torch.float64)
    keep = torch.tensor([True, True, True, False, True, True, False])  # 5 kept
    aligned = align_kept(keep, scores, 4)
    assert aligned.tolist() == [True, False, True, False, True, True, False]  # score 1.0 dropped
    assert torch.equal(align_kept(aligned, scores, 4), aligned) and torch.equal(align_kept(keep, scores, 1), keep)
    assert not align_kept(keep, scores, 8).any()
