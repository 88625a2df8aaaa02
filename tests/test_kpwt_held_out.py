"""KPWT's held-out check and pruner.ridge=auto: fold equations, held-out errors from them, the choice of ridge."""

from __future__ import annotations

import math

import pytest
import torch
from kprune_helpers import make_problem, make_sample, partial_masks, sharpen

from kprune_cli.models.adapters import get_adapter
from kprune_cli.pruners.common.held_out import UNTUNED, cross_validated_ridge, fold_error, held_out_errors
from kprune_cli.pruners.common.lstsq import solve_ridge
from kprune_cli.pruners.common.reconstruction import FoldEquations, normal_equations
from kprune_cli.pruners.common.teacher import Teacher
from kprune_cli.pruners.kprune.pruner import KPrunePruner, check_ridge, held_out_notes
from kprune_cli.pruners.kprune.tune import kpwt
from kprune_cli.runtime.errors import UserError


def _fold(a: torch.Tensor, r: torch.Tensor) -> FoldEquations:
    return FoldEquations(a.T @ a, a.T @ r, r.pow(2).sum())


def _regression(tokens: int, k: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A`` ``(tokens, k)``, ``R = A·W + noise`` ``(tokens, 3)`` and the true ``W`` ``(k, 3)``, float64."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(tokens, k, generator=generator, dtype=torch.float64)
    w = torch.randn(k, 3, generator=generator, dtype=torch.float64)
    return a, a @ w + noise * torch.randn(tokens, 3, generator=generator, dtype=torch.float64), w


def test_fold_error_is_the_squared_error_on_the_folds_tokens():
    a, r, _ = _regression(20, 4, 0.5, seed=0)
    weights = torch.randn(4, 3, dtype=torch.float64)
    assert fold_error(_fold(a, r), weights) == pytest.approx(float((a @ weights - r).pow(2).sum()), rel=1e-10)


def test_held_out_errors_score_each_fold_with_the_fit_on_the_others():
    a, r, _ = _regression(30, 5, 1.0, seed=1)
    folds = [_fold(a[:15], r[:15]), _fold(a[15:], r[15:])]
    prior = torch.zeros(5, 3, dtype=torch.float64)
    errors = held_out_errors(folds, prior, [1e-3])
    by_hand = 0.0
    for seen, unseen in ((slice(15, None), slice(None, 15)), (slice(None, 15), slice(15, None))):
        fit = solve_ridge(a[seen].T @ a[seen], a[seen].T @ r[seen], prior, 1e-3).solution
        by_hand += float((a[unseen] @ fit - r[unseen]).pow(2).sum())
    assert errors.by_ridge[1e-3] == pytest.approx(by_hand, rel=1e-9)
    assert errors.untuned == pytest.approx(float(r.pow(2).sum()), rel=1e-10)


def test_the_cross_validated_ridge_is_small_for_plenty_of_tokens_and_large_or_untuned_for_few():
    a, r, _ = _regression(400, 8, 0.1, seed=2)  # 50 tokens per unknown, little noise: fit freely
    plenty = [_fold(a[i::2], r[i::2]) for i in range(2)]
    ridge, errors = cross_validated_ridge(plenty, torch.zeros(8, 3, dtype=torch.float64))
    assert ridge <= 1e-3 and errors.ratio(ridge) < 0.1
    a, r, w = _regression(40, 20, 3.0, seed=3)  # as many tokens per fold as unknowns: the fit interpolates noise
    few = [_fold(a[i::2], r[i::2]) for i in range(2)]
    ridge, errors = cross_validated_ridge(few, w)  # the prior is already right
    assert errors.ratio(1e-6) > 1.0  # the default ridge makes held-out tokens worse
    assert ridge == UNTUNED or ridge >= 1e-1


def test_fold_equations_add_up_to_the_total_which_they_leave_unchanged(tiny_model):
    model = sharpen(tiny_model("bert"))
    adapter = get_adapter(model)
    teacher = Teacher(model, "classification", make_sample(model, num=24), 2.0, batch_size=None, device="cpu")
    masks = partial_masks(adapter)
    sums = teacher.residual_sums(1)
    plain = normal_equations(model, adapter, masks, teacher.batches, sums, 1)
    folded = normal_equations(model, adapter, masks, teacher.batches, sums, 1, folds=2)
    assert plain.folds == [] and len(folded.folds) == 2
    assert torch.equal(plain.gram, folded.gram) and torch.equal(plain.rhs, folded.rhs)
    torch.testing.assert_close(folded.folds[0].gram + folded.folds[1].gram, folded.gram)
    torch.testing.assert_close(folded.folds[0].rhs + folded.folds[1].rhs, folded.rhs)
    assert len(normal_equations(model, adapter, masks, teacher.batches[:1], sums[:1], 1, folds=2).folds) == 0


def test_kpwt_reports_its_held_out_check_and_auto_chooses_from_it(tiny_model):
    fits = {}
    for ridge in (1e-6, "auto"):
        model = sharpen(tiny_model("bert"))
        adapter = get_adapter(model)
        teacher = Teacher(model, "classification", make_sample(model, num=24), 2.0, batch_size=None, device="cpu")
        masks = partial_masks(adapter)
        tuning = kpwt(model, adapter, masks, teacher.batches, teacher.residual_sums(1), 1, ridge, check=True)
        fits[ridge] = tuning, adapter.layers()[0].ffn_out.weight.detach().clone()
    plain, auto = fits[1e-6][0], fits["auto"][0]
    assert plain.ridge == 1e-6 and plain.held_out is not None and plain.held_out > 0
    assert auto.held_out is not None and auto.held_out <= plain.held_out  # the best of a grid that holds 1e-6
    if auto.ridge == UNTUNED:  # left as it was
        original = sharpen(tiny_model("bert")).bert.encoder.layer[0].output.dense.weight
        torch.testing.assert_close(fits["auto"][1], original)


def test_auto_ridge_prunes_and_records_each_sub_layer(tiny_model):
    result = KPrunePruner(ridge="auto", micro_batch_size=4).prune(make_problem(sharpen(tiny_model("bert"))))
    checked = result.settings["kpwt_held_out"]
    assert checked and all(entry["ridge"] == "untuned" or entry["ridge"] > 0 for entry in checked.values())
    assert any(note.startswith("pruner.ridge=auto:") for note in result.notes)
    default = KPrunePruner(micro_batch_size=4).prune(make_problem(sharpen(tiny_model("bert"))))
    assert all(entry["ridge"] == pytest.approx(1e-6) for entry in default.settings["kpwt_held_out"].values())


def test_held_out_notes_name_the_overfitted_sub_layers():
    checked = {"0": {"ridge": 1e-6, "ratio": 0.4}, "1": {"ridge": 1e-6, "ratio": 2.5},
               "2": {"ridge": 1e-6, "ratio": 1.2}}
    (note,) = held_out_notes(checked, 1e-6, 1500, 4)
    assert "2 of 3 sub-layers" in note and "FFN 0" in note and "2.50x" in note and "1,500 tokens" in note
    assert held_out_notes({"0": {"ridge": 1e-6, "ratio": 0.9}}, 1e-6, 1500, 4) == []
    auto_checked = {"0": {"ridge": 0.1, "ratio": 0.9}, "3": {"ridge": math.inf, "ratio": 1.0}}
    (auto,) = held_out_notes(auto_checked, "auto", 10, 4)
    assert "1 of 2 sub-layers tuned" in auto and "FFN 1" in auto
    (single,) = held_out_notes({}, "auto", 10, 1)
    assert "one micro-batch" in single and "default ridge" in single


@pytest.mark.parametrize("value, selection, affine, message", [
    (-1.0, "score", False, "pruner.ridge=-1.0"), ("big", "score", False, "pruner.ridge=big"),
    ("auto", "reconstruction", False, "plain KPWT"), ("auto", "score", True, "plain KPWT")])
def test_bad_ridge_values_are_one_line_errors(value, selection, affine, message):
    with pytest.raises(UserError, match=message):
        check_ridge(value, selection, affine)
