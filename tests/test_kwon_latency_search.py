"""Kwon et al.'s latency-constrained mask search on plain tensors: the piecewise-linear fit, budgets,
the official loop's cumulative-budget defect, ties."""

from __future__ import annotations

import itertools

import pytest
import torch

from kprune_cli.pruners.kwon.search import PiecewiseLinear, fit_piecewise_linear, search_latency_masks

SLACK = 1 + 1e-9  # the search's relative budget tolerance


def _table(units: int, threshold: int, constant: float, slope: float) -> list[float]:
    """Latency for widths 0..units: 0, then ``constant`` up to ``threshold`` units and ``slope`` per unit more."""
    return [0.0] + [constant + slope * max(width - threshold, 0) for width in range(1, units + 1)]


def _importance(seed: int, layers: int = 3, heads: int = 4, neurons: int = 6) -> dict[int, torch.Tensor]:
    """Random non-negative importance by sub-layer: ``layers`` × (``heads`` heads, ``neurons`` neurons)."""
    generator = torch.Generator().manual_seed(seed)
    return {s: torch.rand(heads if s % 2 == 0 else neurons, generator=generator, dtype=torch.float64) ** 2
            for s in range(2 * layers)}


def _latency(keep: dict[int, torch.Tensor], mha_ms: list[float], ffn_ms: list[float]) -> float:
    return sum((mha_ms if s % 2 == 0 else ffn_ms)[int(mask.sum())] for s, mask in keep.items())


def _kept_importance(keep: dict[int, torch.Tensor], importance: dict[int, torch.Tensor]) -> float:
    return sum(float(importance[s][mask].sum()) for s, mask in keep.items())


def _brute_force(importance: dict[int, torch.Tensor], mha_ms: list[float], ffn_ms: list[float], budget: float,
                 allowed=lambda widths: True) -> float:
    """The most importance kept by any per-sub-layer widths (each keeping its top units) within ``budget``."""
    sublayers = sorted(importance)
    top = {s: torch.cat([torch.zeros(1, dtype=torch.float64), importance[s].sort(descending=True).values.cumsum(0)])
           for s in sublayers}
    best = float("-inf")
    for widths in itertools.product(*(range(importance[s].numel() + 1) for s in sublayers)):
        cost = sum((mha_ms if s % 2 == 0 else ffn_ms)[w] for s, w in zip(sublayers, widths))
        if cost <= budget and allowed(widths):
            best = max(best, sum(float(top[s][w]) for s, w in zip(sublayers, widths)))
    return best


def _official_considered(layers: int, mha: PiecewiseLinear, ffn: PiecewiseLinear, budget: float) -> set[tuple]:
    """The (MHA drops, FFN drops) pairs the official ``search_latency`` scores: its budget arithmetic, verbatim in
    effect: ``max_latency`` loses the kept sub-layers' base cost at every inner step and a negative one is skipped."""
    considered, max_latency = set(), budget
    for mha_drops in range(layers):
        for ffn_drops in range(layers):
            max_latency = max_latency - ((layers - mha_drops) * mha.constant + (layers - ffn_drops) * ffn.constant)
            if max_latency < 0:
                continue
            considered.add((mha_drops, ffn_drops))
    return considered


@pytest.mark.parametrize("threshold,constant,slope", [(3, 2.0, 0.25), (1, 0.5, 1.5), (7, 1.25, 0.125), (8, 3.0, 0.0)])
def test_fit_recovers_a_piecewise_linear_table(threshold, constant, slope):
    table = _table(10, threshold, constant, slope)[1:]
    assert fit_piecewise_linear(table) == PiecewiseLinear(threshold if slope else 1, constant, slope)


def test_fit_clips_a_falling_tail_and_prefers_the_smallest_threshold():
    assert fit_piecewise_linear([4.0, 4.0, 3.0, 2.0, 1.0]).slope == 0.0  # least squares would give a negative slope
    assert fit_piecewise_linear([1.5] * 6) == PiecewiseLinear(1, 1.5, 0.0)  # every threshold fits exactly
    noisy = [1.0, 1.1, 0.9, 1.0, 2.0, 3.1, 3.9, 5.0]
    fit = fit_piecewise_linear(noisy)
    assert fit.threshold == 4 and fit.slope == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("seed", range(4))
def test_budget_is_respected_and_more_budget_never_keeps_less(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    mha_ms = _table(4, int(torch.randint(1, 5, (1,), generator=generator)), 1.0, 0.25)
    ffn_ms = _table(6, int(torch.randint(1, 7, (1,), generator=generator)), 2.0, 0.125)
    importance = _importance(seed)
    full = _latency({s: torch.ones_like(v, dtype=torch.bool) for s, v in importance.items()}, mha_ms, ffn_ms)
    kept = []
    for fraction in torch.linspace(0, 1.1, 23).tolist():
        keep = search_latency_masks(importance, mha_ms, ffn_ms, fraction * full)
        assert _latency(keep, mha_ms, ffn_ms) <= fraction * full * SLACK
        kept.append(_kept_importance(keep, importance))
    assert kept == sorted(kept) and kept[0] == 0 and kept[-1] == pytest.approx(sum(float(v.sum()) for v in importance.values()))


def test_the_official_cumulative_budget_skips_the_best_configuration_ours_finds_it():
    # 1 ms for a sub-layer's first unit, 1 ms for each further one: 6 ms buy 6 units.
    mha_ms = ffn_ms = _table(3, 1, 1.0, 1.0)
    importance = {0: torch.tensor([1.0, 0.75, 0.75]), 2: torch.tensor([1.0, 0.75, 0.75]),
                  1: torch.tensor([1.0, 0.75, 0.75]), 3: torch.tensor([0.0625, 0.0, 0.0])}
    budget = 6.0
    keep = search_latency_masks(importance, mha_ms, ffn_ms, budget)

    emptied = (sum(not keep[s].any() for s in (0, 2)), sum(not keep[s].any() for s in (1, 3)))
    assert emptied == (0, 1) and not keep[3].any()  # the FFN with the least base importance is emptied
    fit = fit_piecewise_linear(mha_ms[1:])
    assert emptied not in _official_considered(2, fit, fit, budget)  # the official loop never scores it
    best = _brute_force(importance, mha_ms, ffn_ms, budget)
    assert _kept_importance(keep, importance) == pytest.approx(best)
    # Every configuration the official loop scores keeps strictly less than the optimum.
    assert _brute_force(importance, mha_ms, ffn_ms, budget, allowed=lambda widths: all(widths)) < best - 0.5


def test_a_huge_budget_keeps_everything_and_an_infeasible_one_empties_everything():
    importance = _importance(7)
    mha_ms, ffn_ms = _table(4, 2, 1.0, 0.5), _table(6, 3, 2.0, 0.25)
    assert all(mask.all() for mask in search_latency_masks(importance, mha_ms, ffn_ms, 1e9).values())
    for budget in (0.0, 0.99):  # below the cheapest non-empty sub-layer (1 ms)
        assert not any(mask.any() for mask in search_latency_masks(importance, mha_ms, ffn_ms, budget).values())


@pytest.mark.parametrize("seed", range(3))
def test_kept_sub_layers_keep_their_locally_top_units_at_least_the_base(seed):
    importance = _importance(seed, layers=4, heads=6, neurons=8)
    mha_ms, ffn_ms = _table(6, 2, 1.0, 0.25), _table(8, 3, 1.5, 0.125)
    full = _latency({s: torch.ones_like(v, dtype=torch.bool) for s, v in importance.items()}, mha_ms, ffn_ms)
    for fraction in (0.3, 0.5, 0.7):
        keep = search_latency_masks(importance, mha_ms, ffn_ms, fraction * full)
        assert any(mask.any() for mask in keep.values()) and not all(mask.all() for mask in keep.values())
        for s, mask in keep.items():
            if mask.any() and not mask.all():
                assert importance[s][mask].min() >= importance[s][~mask].max()
                assert int(mask.sum()) >= (2 if s % 2 == 0 else 3)


def test_deterministic_with_documented_ties():
    importance = {s: torch.ones(2) for s in range(6)}  # every sub-layer alike: cost 1, importance 2
    mha_ms = ffn_ms = _table(2, 1, 1.0, 0.0)
    keep = search_latency_masks(importance, mha_ms, ffn_ms, 4.0)
    # (0, 2), (1, 1) and (2, 0) emptied tie: the fewest emptied MHA wins, the earlier FFN sub-layers are emptied.
    assert {s: bool(mask.any()) for s, mask in keep.items()} == {0: True, 2: True, 4: True, 1: False, 3: False, 5: True}
    again = search_latency_masks(importance, mha_ms, ffn_ms, 4.0)
    assert all(torch.equal(keep[s], again[s]) for s in keep)


def test_a_fixed_cost_at_width_zero_is_taken_off_the_budget():
    importance = _importance(3)
    mha_ms, ffn_ms = _table(4, 2, 1.0, 0.5), _table(6, 3, 2.0, 0.25)
    keep = search_latency_masks(importance, mha_ms, ffn_ms, 7.0)
    shifted = search_latency_masks(importance, [v + 0.5 for v in mha_ms], [v + 0.25 for v in ffn_ms], 7.0 + 3 * 0.75)
    assert any(mask.any() for mask in keep.values())
    assert all(torch.equal(keep[s], shifted[s]) for s in keep)
    below = search_latency_masks(importance, [v + 0.5 for v in mha_ms], [v + 0.25 for v in ffn_ms], 3 * 0.75 - 0.1)
    assert not any(mask.any() for mask in below.values())  # not even every sub-layer emptied fits: all emptied


def test_rejects_mismatched_tables_and_negative_budgets():
    importance = _importance(0)
    with pytest.raises(ValueError, match="5 units"):
        search_latency_masks(importance, _table(4, 1, 1.0, 0.5), _table(5, 1, 1.0, 0.5), 3.0)
    for budget in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="non-negative"):
            search_latency_masks(importance, _table(4, 1, 1.0, 0.5), _table(6, 1, 1.0, 0.5), budget)
