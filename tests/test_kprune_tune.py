"""KPWT and the ridge solve: reconstruction improves, distillation loss drops, failures are reported."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kprune_helpers import make_problem, make_sample, partial_masks, sharpen

from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.pruners.common.hooks import capture_taps, forward_until
from kprune_cli.pruners.common.lstsq import solve_ridge
from kprune_cli.pruners.common.reconstruction import normal_equations, resolve_gram_precision
from kprune_cli.pruners.common.teacher import Teacher, distillation_loss
from kprune_cli.pruners.kprune.pruner import KPrunePruner
from kprune_cli.pruners.kprune.tune import kpwt
from kprune_cli.runtime.errors import UserError


def _setup(tiny_model, sharp: bool = False):
    model = tiny_model("bert")
    if sharp:
        sharpen(model)
    adapter = get_adapter(model)
    teacher = Teacher(model, "classification", make_sample(model, num=24), 2.0, batch_size=None, device="cpu")
    masks = partial_masks(adapter)
    return model, adapter, teacher, masks


@torch.no_grad()
def _reconstruction_error(model, adapter, masks, teacher, sublayer) -> float:
    """Σ over real tokens of ||student pre-LN sum − teacher pre-LN sum||² at ``sublayer``."""
    parts = adapter.layers()[sublayer // 2]
    tap = parts.sum_tap("mha" if sublayer % 2 == 0 else "ffn")
    error = 0.0
    for batch, target in zip(teacher.batches, teacher.residual_sums(sublayer)):
        with apply_masks(adapter, masks), capture_taps({"sum": tap}) as store:
            forward_until(model, batch.inputs, tap)
        error += float((store["sum"][batch.token_mask] - target).pow(2).sum())
    return error


@torch.no_grad()
def _distillation_loss(model, adapter, masks, teacher) -> float:
    total = 0.0
    with apply_masks(adapter, masks):
        for batch in teacher.batches:
            total += float(distillation_loss(model(**batch.inputs), batch.target, teacher.kind,
                                             teacher.temperature, batch.token_mask).sum())
    return total


def test_teacher_residual_sums_are_the_pre_layernorm_sums(tiny_model):
    model = tiny_model("bert")
    teacher = Teacher(model, "classification", make_sample(model), 2.0, batch_size=5, device="cpu")
    layer = model.bert.encoder.layer[1]
    with torch.no_grad():
        for index, batch in enumerate(teacher.batches):
            hidden = model(**batch.inputs, output_hidden_states=True).hidden_states[2][batch.token_mask]
            attn_sum, ffn_sum = teacher.residual_sums(2)[index], teacher.residual_sums(3)[index]
            torch.testing.assert_close(layer.output.LayerNorm(ffn_sum), hidden)
            attended = layer.attention.output.LayerNorm(attn_sum)
            expected_ffn_sum = attended + layer.output.dense(F.gelu(layer.intermediate.dense(attended)))
            torch.testing.assert_close(ffn_sum, expected_ffn_sum)


def test_kpwt_reduces_reconstruction_error(tiny_model):
    model, adapter, teacher, masks = _setup(tiny_model)
    for sublayer in range(4):
        before = _reconstruction_error(model, adapter, masks, teacher, sublayer)
        notes = kpwt(model, adapter, masks, teacher.batches, teacher.residual_sums(sublayer), sublayer).notes
        after = _reconstruction_error(model, adapter, masks, teacher, sublayer)
        assert notes == []
        assert after < 0.9 * before


def test_kpwt_lowers_the_distillation_loss_at_the_same_masks(tiny_model):
    model, adapter, teacher, masks = _setup(tiny_model, sharp=True)
    untuned = _distillation_loss(model, adapter, masks, teacher)
    for sublayer in range(4):
        kpwt(model, adapter, masks, teacher.batches, teacher.residual_sums(sublayer), sublayer)
    assert _distillation_loss(model, adapter, masks, teacher) < untuned


def test_kpwt_solves_duplicate_columns_with_the_ridge(tiny_model):
    model = tiny_model("bert")
    ffn_in = model.bert.encoder.layer[0].intermediate.dense
    with torch.no_grad():  # neurons 0 and 1 identical: AᵀA is singular
        ffn_in.weight[0] = ffn_in.weight[1]
        ffn_in.bias[0] = ffn_in.bias[1]
    adapter = get_adapter(model)
    teacher = Teacher(model, "classification", make_sample(model, num=24), 2.0, batch_size=None, device="cpu")
    masks = Masks.ones(adapter)
    masks.neurons[0][2::2] = 0.0
    before = _reconstruction_error(model, adapter, masks, teacher, 1)
    notes = kpwt(model, adapter, masks, teacher.batches, teacher.residual_sums(1), 1).notes
    assert notes == [] or all("ridge" in note for note in notes)
    assert torch.isfinite(adapter.layers()[0].ffn_out.weight).all()
    assert _reconstruction_error(model, adapter, masks, teacher, 1) < before


def test_kpwt_reports_and_skips_a_non_finite_system(tiny_model):
    model, adapter, teacher, masks = _setup(tiny_model)
    sums = [target.clone() for target in teacher.residual_sums(2)]
    sums[0][0, 0] = float("nan")
    weight = adapter.layers()[1].attn_out.weight.detach().clone()
    notes = kpwt(model, adapter, masks, teacher.batches, sums, 2).notes
    assert len(notes) == 1 and "sub-layer 2" in notes[0] and "untuned" in notes[0]
    torch.testing.assert_close(adapter.layers()[1].attn_out.weight, weight, rtol=0, atol=0)


def test_kpwt_without_survivors_changes_nothing(tiny_model):
    model, adapter, teacher, masks = _setup(tiny_model)
    masks.heads[1][:] = 0.0
    weight = adapter.layers()[1].attn_out.weight.detach().clone()
    assert kpwt(model, adapter, masks, teacher.batches, teacher.residual_sums(2), 2).notes == []
    torch.testing.assert_close(adapter.layers()[1].attn_out.weight, weight, rtol=0, atol=0)


def test_solve_ridge_matches_least_squares():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200, 10, generator=generator, dtype=torch.float64)
    r = torch.randn(200, 3, generator=generator, dtype=torch.float64)
    result = solve_ridge(a.T @ a, a.T @ r, prior=torch.randn(10, 3, generator=generator, dtype=torch.float64))
    assert result.attempts == 1 and not result.fell_back
    torch.testing.assert_close(result.solution, torch.linalg.lstsq(a, r).solution, rtol=0, atol=1e-5)


def test_solve_ridge_keeps_the_prior_where_the_data_says_nothing():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    a[:, 2] = 0.0
    prior = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    result = solve_ridge(a.T @ a, a.T @ (a @ prior), prior)
    torch.testing.assert_close(result.solution, prior)


def test_solve_ridge_grows_the_ridge_then_gives_up():
    indefinite = torch.diag(torch.tensor([1.0, -1e-5], dtype=torch.float64))
    grown = solve_ridge(indefinite, torch.ones(2, 1, dtype=torch.float64))
    assert grown.solution is not None and grown.fell_back and grown.attempts == 3
    assert grown.ridge == pytest.approx(1e-4)
    hopeless = solve_ridge(-torch.eye(2, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64))
    assert hopeless.solution is None and hopeless.attempts == 4
    nan = solve_ridge(torch.full((2, 2), float("nan"), dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64))
    assert nan.solution is None


def test_float32_gram_products_match_the_float64_ones_closely(tiny_model):
    model, adapter, teacher, masks = _setup(tiny_model, sharp=True)
    systems = {precision: normal_equations(model, adapter, masks, teacher.batches, teacher.residual_sums(1), 1,
                                           precision=precision) for precision in ("float64", "float32")}
    for name in ("gram", "rhs"):
        exact, fast = getattr(systems["float64"], name), getattr(systems["float32"], name)
        assert fast.dtype == torch.float64 and not torch.equal(fast, exact)  # the products did differ
        torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-6 * float(exact.abs().max()))


def test_kprune_with_float32_gram_products_stays_close_to_float64(tiny_model):
    results = {}
    for precision in ("float64", "float32"):
        model = sharpen(tiny_model("bert"))
        result = KPrunePruner(gram_precision=precision).prune(make_problem(model))
        results[precision] = result, [parts.out_proj(kind).weight.detach().clone()
                                      for parts in get_adapter(model).layers() for kind in ("mha", "ffn")]
    (exact, exact_weights), (fast, fast_weights) = results["float64"], results["float32"]
    assert exact.masks.kept() == fast.masks.kept()
    for a, b in zip(exact_weights, fast_weights):  # float32 round-off, amplified by the solve's conditioning
        assert float((b - a).norm() / a.norm()) < 1e-4
    assert any("float32 products" in note and "pruner.gram_precision=float32 asked" in note for note in fast.notes)
    assert not any("float32 products" in note for note in exact.notes)


def test_gram_precision_auto_keeps_float64_except_on_gpus_with_slow_float64(monkeypatch):
    assert resolve_gram_precision("auto", torch.device("cpu")) == "float64"
    assert resolve_gram_precision("float32", torch.device("cpu")) == "float32"
    for capability, expected in (((8, 0), "float64"), ((9, 0), "float64"), ((8, 6), "float32"), ((7, 5), "float32")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert resolve_gram_precision("auto", torch.device("cuda", 0)) == expected
    with pytest.raises(UserError, match="gram_precision='float16'"):
        KPrunePruner(gram_precision="float16")
