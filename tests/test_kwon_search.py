"""Kwon et al.'s mask search and rearrangement on plain tensors: budgets, brute-force optima, counts, objective."""

from __future__ import annotations

import itertools

import pytest
import torch

from kprune_cli.models.flops import FlopsModel
from kprune_cli.pruners.kwon.rearrange import pruned_loss, rearrange_units
from kprune_cli.pruners.kwon.search import search_masks

# A head costs 20 FLOPs and a neuron 8 (d=2, d_h=1, S=1): splits between heads and neurons matter.
SMALL_FLOPS = FlopsModel(hidden_size=2, head_size=1, seq_len=1)


def _instance(seed: int, heads: int = 2, neurons: int = 3, layers: int = 2) -> dict[int, torch.Tensor]:
    """Random non-negative importance by sub-layer: ``layers`` × (``heads`` heads, ``neurons`` neurons)."""
    generator = torch.Generator().manual_seed(seed)
    return {s: torch.rand(heads if s % 2 == 0 else neurons, generator=generator, dtype=torch.float64) ** 2
            for s in range(2 * layers)}


def _cost(keep: dict[int, torch.Tensor], flops: FlopsModel) -> float:
    return sum(float(mask.sum()) * flops.cost("mha" if s % 2 == 0 else "ffn") for s, mask in keep.items())


def _kept_importance(keep: dict[int, torch.Tensor], importance: dict[int, torch.Tensor]) -> float:
    return sum(float(importance[s][mask].sum()) for s, mask in keep.items())


def _brute_force(importance: dict[int, torch.Tensor], flops: FlopsModel, budget: float) -> float:
    """The most importance any subset of units within ``budget`` keeps (every subset enumerated)."""
    units = [(float(value), flops.cost("mha" if s % 2 == 0 else "ffn"))
             for s, values in importance.items() for value in values]
    best = 0.0
    for chosen in itertools.product((False, True), repeat=len(units)):
        cost = sum(c for (_, c), take in zip(units, chosen) if take)
        if cost <= budget:
            best = max(best, sum(v for (v, _), take in zip(units, chosen) if take))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_search_matches_the_brute_force_optimum_within_budget(seed):
    importance = _instance(seed)
    total = SMALL_FLOPS.total([{"heads": 2, "neurons": 3}] * 2)  # 4 heads, 6 neurons: 128 FLOPs
    for rate in (0.1, 0.3, 0.5, 0.7, 0.9):
        budget = (1 - rate) * total
        keep = search_masks(importance, SMALL_FLOPS, budget)
        assert _cost(keep, SMALL_FLOPS) <= budget
        assert _kept_importance(keep, importance) == pytest.approx(_brute_force(importance, SMALL_FLOPS, budget))


def test_search_keeps_the_most_important_units_of_each_kind():
    importance = _instance(0, heads=4, neurons=16, layers=3)
    keep = search_masks(importance, SMALL_FLOPS, 0.5 * SMALL_FLOPS.total([{"heads": 4, "neurons": 16}] * 3))
    for kind_sublayers in ([0, 2, 4], [1, 3, 5]):
        kept = torch.cat([importance[s][keep[s]] for s in kind_sublayers])
        pruned = torch.cat([importance[s][~keep[s]] for s in kind_sublayers])
        assert kept.numel() and pruned.numel()
        assert kept.min() >= pruned.max()  # a global threshold per kind
    assert [keep[s].shape for s in range(6)] == [importance[s].shape for s in range(6)]
    assert all(keep[s].dtype == torch.bool for s in range(6))


def test_search_extremes():
    importance = _instance(1)
    total = SMALL_FLOPS.total([{"heads": 2, "neurons": 3}] * 2)
    assert all(mask.all() for mask in search_masks(importance, SMALL_FLOPS, total).values())
    assert not any(mask.any() for mask in search_masks(importance, SMALL_FLOPS, 7.0).values())  # < one neuron


def test_search_rejects_nan_importance():
    importance = _instance(2)
    importance[1][0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        search_masks(importance, SMALL_FLOPS, 64.0)


def test_rearrange_keeps_the_count_and_never_raises_the_objective():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        units = int(torch.randint(2, 30, (1,), generator=generator))
        grads = torch.randn(8, units, generator=generator) * torch.rand(units, generator=generator)
        keep = torch.rand(units, generator=generator) < 0.5
        rearranged = rearrange_units(keep, grads)
        assert rearranged.dtype == torch.bool and rearranged.shape == keep.shape
        assert int(rearranged.sum()) == int(keep.sum())
        assert pruned_loss(rearranged, grads) <= pruned_loss(keep, grads) * (1 + 1e-9) + 1e-12


def _official_greedy(num_pruned: int, grads: torch.Tensor) -> torch.Tensor:
    """A literal transcription of the official ``greedy_rearrange`` (list order, direct norms)."""
    vectors = grads.T.double()  # (units, batches)
    order = vectors.pow(2).sum(dim=1).sort().indices.tolist()
    masked = order[:num_pruned]
    for index in order[num_pruned:]:
        masked.append(index)
        members = vectors[masked]
        del masked[int(((members.sum(dim=0) - members).pow(2).sum(dim=1)).argmin())]
    keep = torch.ones(grads.shape[1], dtype=torch.bool)
    keep[masked] = False
    return keep


def test_rearrange_matches_the_official_greedy_from_the_diagonal_choice():
    generator = torch.Generator().manual_seed(1)
    for trial in range(10):
        grads = torch.randn(6, 24, generator=generator) * torch.rand(24, generator=generator)
        num_pruned = 3 + trial
        diagonal = grads.pow(2).sum(dim=0).double()
        keep = torch.ones(24, dtype=torch.bool)
        keep[diagonal.sort().indices[:num_pruned]] = False  # what the search keeps within one sub-layer
        assert torch.equal(rearrange_units(keep, grads), _official_greedy(num_pruned, grads))


def test_rearrange_prunes_units_whose_gradients_cancel():
    # Units 0 and 1 have the largest diagonal Fisher but cancel out; unit 2 is alone.
    grads = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.9]])  # (batches, units)
    keep = torch.tensor([False, True, False])  # the diagonal choice: keep one of the large ones
    rearranged = rearrange_units(keep, grads)
    assert rearranged.tolist() == [False, False, True]
    assert pruned_loss(rearranged, grads) == pytest.approx(0.0)
    assert pruned_loss(keep, grads) == pytest.approx(1.81)


def test_rearrange_leaves_all_kept_or_all_pruned_alone():
    grads = torch.randn(4, 5, generator=torch.Generator().manual_seed(3))
    for keep in (torch.ones(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)):
        assert torch.equal(rearrange_units(keep, grads), keep)
