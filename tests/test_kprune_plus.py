"""The opt-in K-prune switches of docs/kprune-plus.md: compensation-aware selection (structured OBS on
KPWT's ridge system) and affine KPWT, checked against brute force, fresh solves and the default run."""

from __future__ import annotations

import pytest
import torch
from kprune_helpers import make_problem, make_sample, partial_masks, sharpen

from kprune_cli.models.adapters import get_adapter
from kprune_cli.pruners.common.affine import centred, refit_bias
from kprune_cli.pruners.common.obs_selection import greedy_removal
from kprune_cli.pruners.common.reconstruction import sublayer_activations
from kprune_cli.pruners.common.teacher import Teacher
from kprune_cli.pruners.kprune.pruner import KPrunePruner
from kprune_cli.pruners.kprune.select import candidates
from kprune_cli.pruners.kprune.tune import kpwt
from kprune_cli.runtime.errors import UserError

RIDGE = 1e-3


def _system(units: int, width: int, outputs: int = 5, tokens: int = 80, seed: int = 0):
    """Random ``A`` ``(tokens, units·width)`` with columns of different scales, ``R`` ``(tokens, outputs)``
    with a non-zero mean, and a prior ``(units·width, outputs)``."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(tokens, units * width, generator=generator, dtype=torch.float64)
    a = a * torch.linspace(0.3, 2.0, units * width, dtype=torch.float64) + 0.5
    r = a @ torch.randn(units * width, outputs, generator=generator, dtype=torch.float64)
    r = r + torch.randn(tokens, outputs, generator=generator, dtype=torch.float64) + 1.5
    prior = torch.randn(units * width, outputs, generator=generator, dtype=torch.float64)
    return a, r, prior


def _lam(gram: torch.Tensor) -> float:
    return RIDGE * float(gram.diagonal().mean())


def _fresh(a, r, prior, columns, lam):
    """The ridge solution and objective ``||A_S W − R||² + λ||W − P_S||² + λ||P_M||²`` on ``columns`` only."""
    a_s, p_s = a[:, columns], prior[columns]
    gram = a_s.T @ a_s + lam * torch.eye(len(columns), dtype=torch.float64)
    solution = torch.linalg.solve(gram, a_s.T @ r + lam * p_s)
    dropped = torch.ones(a.shape[1], dtype=torch.bool)
    dropped[columns] = False
    error = (a_s @ solution - r).pow(2).sum() + lam * (solution - p_s).pow(2).sum() + lam * prior[dropped].pow(2).sum()
    return solution, float(error)


def _columns(units, width):
    return torch.tensor([unit * width + offset for unit in units for offset in range(width)])


@pytest.mark.parametrize("width", [1, 3])
def test_one_greedy_step_is_the_best_single_removal_by_brute_force(width):
    units = 7
    a, r, prior = _system(units, width)
    gram, rhs = a.T @ a, a.T @ r
    removal = greedy_removal(gram, rhs, prior, width, torch.arange(units), 1, RIDGE)
    errors = [_fresh(a, r, prior, _columns([u for u in range(units) if u != gone], width), _lam(gram))[1]
              for gone in range(units)]
    assert removal.removed == [min(range(units), key=errors.__getitem__)]
    survivors = _columns([u for u in range(units) if u != removal.removed[0]], width)
    torch.testing.assert_close(removal.solution, _fresh(a, r, prior, survivors, _lam(gram))[0])


@pytest.mark.parametrize("width", [1, 4])
def test_rank_updates_equal_a_fresh_solve_after_several_removals(width):
    units = 9
    a, r, prior = _system(units, width, seed=1)
    gram, rhs = a.T @ a, a.T @ r
    pool = torch.tensor([0, 2, 3, 5, 6, 8])
    removal = greedy_removal(gram, rhs, prior, width, pool, 4, RIDGE)
    assert len(set(removal.removed)) == 4 and set(removal.removed) <= set(pool.tolist())
    survivors = _columns([u for u in range(units) if u not in removal.removed], width)
    torch.testing.assert_close(removal.solution, _fresh(a, r, prior, survivors, _lam(gram))[0])


def test_greedy_removes_every_candidate_and_breaks_ties_by_lowest_index():
    gram = torch.eye(4, dtype=torch.float64)
    rhs = torch.tensor([[3.0], [1.0], [2.0], [1.0]], dtype=torch.float64)  # units 1 and 3 cost the same
    removal = greedy_removal(gram, rhs, torch.zeros_like(rhs), 1, torch.arange(4), 1, RIDGE)
    assert removal.removed == [1]
    everything = greedy_removal(gram, rhs, torch.zeros_like(rhs), 1, torch.arange(4), 4, RIDGE)
    assert sorted(everything.removed) == [0, 1, 2, 3] and everything.solution.shape == (0, 1)


def test_candidates_are_the_bottom_twice_the_removals_in_kpms_order():
    scores = torch.tensor([5.0, 1.0, float("-inf"), 3.0, 1.0, 4.0, 2.0])
    alive = torch.isfinite(scores)
    assert candidates(scores, alive, 1).tolist() == [1, 4]  # tied lowest scores: both
    assert candidates(scores, alive, 2).tolist() == [1, 3, 4, 6]
    assert candidates(scores, alive, 5).tolist() == [0, 1, 3, 4, 5, 6]  # fewer alive than 2r: all


def test_affine_fit_residual_is_never_worse_and_fits_the_mean():
    a, r, _ = _system(6, 1, tokens=120, seed=2)
    gram, rhs = a.T @ a, a.T @ r
    eye = torch.eye(6, dtype=torch.float64)
    plain = torch.linalg.solve(gram + 1e-9 * eye, rhs)
    gram_c, rhs_c = centred(gram, rhs, a.sum(0), r.sum(0), a.shape[0])
    weights = torch.linalg.solve(gram_c + 1e-9 * eye, rhs_c)
    bias = refit_bias(torch.zeros(r.shape[1], dtype=torch.float64), weights, a.sum(0), r.sum(0), a.shape[0])
    affine_residual = a @ weights + bias - r
    assert float(affine_residual.pow(2).sum()) <= float((a @ plain - r).pow(2).sum())
    torch.testing.assert_close(affine_residual.mean(0), torch.zeros(r.shape[1], dtype=torch.float64))


def test_affine_kpwt_with_no_survivors_sets_the_bias_to_the_targets_mean(tiny_model):
    model = tiny_model("bert")
    adapter = get_adapter(model)
    teacher = Teacher(model, "classification", make_sample(model, num=12), 2.0, batch_size=None, device="cpu")
    masks = partial_masks(adapter)
    masks.neurons[0].zero_()
    sums = teacher.residual_sums(1)
    target = torch.cat([sum_ - sublayer_activations(model, adapter, masks, batch, 1).x
                        for batch, sum_ in zip(teacher.batches, sums)])  # (tokens, d): Y − X
    bias = adapter.layers()[0].out_proj("ffn").bias
    before = bias.detach().clone()
    assert kpwt(model, adapter, masks, teacher.batches, sums, 1, affine=True).notes == []
    torch.testing.assert_close(bias.detach(), target.mean(0))
    assert not torch.allclose(before, target.mean(0))


def _run(model, **options):
    problem = make_problem(model, rate=0.6)
    result = KPrunePruner(**options).prune(problem)
    return result, problem.model.state_dict()


def test_switches_off_give_exactly_the_default_run(tiny_model):
    default, default_weights = _run(sharpen(tiny_model("bert")))
    off, off_weights = _run(sharpen(tiny_model("bert")), selection="score", affine_tuning=False, norm_refit=False)
    for got, want in zip(off.masks.heads + off.masks.neurons, default.masks.heads + default.masks.neurons):
        assert torch.equal(got, want)
    assert all(torch.equal(off_weights[key], default_weights[key]) for key in default_weights)


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_selection_keeps_kpms_counts_and_changes_the_choice(tiny_model, family):
    model = sharpen(tiny_model(family))
    problem = make_problem(model, rate=0.6)
    pruner = KPrunePruner(selection="reconstruction", affine_tuning=True)
    result = pruner.prune(problem)
    plain = KPrunePruner().prune(make_problem(sharpen(tiny_model(family)), rate=0.6))
    first = (result.masks.heads[0], plain.masks.heads[0])  # sub-layer 0: the same KPMS count
    assert int(first[0].sum()) == int(first[1].sum())
    assert any(not torch.equal(a, b) for a, b in zip(result.masks.heads + result.masks.neurons,
                                                    plain.masks.heads + plain.masks.neurons))
    assert problem.flops.total(result.masks.kept()) <= problem.budget * (1 + 1e-9)
    assert pruner.state_dict()["selection"] == "reconstruction" and pruner.state_dict()["affine_tuning"] is True


def test_selection_also_runs_with_bf16_measurement(tiny_model):
    result, _ = _run(sharpen(tiny_model("bert")), selection="reconstruction", autocast="bf16")
    assert all(torch.isfinite(mask).all() for mask in result.masks.heads + result.masks.neurons)


@pytest.mark.parametrize("options", [
    {"selection": "magic"}, {"selection": "reconstruction", "tune": False},
    {"selection": "reconstruction", "iterative": False}, {"affine_tuning": True, "tune": False},
])
def test_rejects_switches_that_cannot_work(options):
    with pytest.raises(UserError):
        KPrunePruner(**options)


def test_resume_with_other_switches_is_refused(tiny_model):
    pruner = KPrunePruner(selection="reconstruction")
    pruner.prune(make_problem(sharpen(tiny_model("bert")), rate=0.6))
    with pytest.raises(UserError, match="pruner.selection=reconstruction"):
        KPrunePruner().load_state_dict(pruner.state_dict())
