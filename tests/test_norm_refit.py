"""The LayerNorm re-fit after tuning (opt-in ``pruner.norm_refit``, docs/kprune-plus.md): the per-channel
closed form, its held-out choice of shrinkage, and the pruner's use of it on post-LN and pre-norm families."""

from __future__ import annotations

import pytest
import torch
from kprune_helpers import make_problem, make_sample, partial_masks, sharpen
from torch.nn import functional as F

from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.masks import Masks
from kprune_cli.pruners.common.norm_refit import (ChannelMoments, fit_channels, following_norm, match_moments,
                                                  refit_norm, write_norm)
from kprune_cli.pruners.common.reconstruction import sublayer_activations
from kprune_cli.pruners.common.teacher import Teacher
from kprune_cli.pruners.kprune.pruner import KPrunePruner
from kprune_cli.pruners.kprune.tune import kpwt
from kprune_cli.runtime.errors import UserError


def _data(tokens: int = 300, channels: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    n = torch.randn(tokens, channels, generator=generator, dtype=torch.float64)
    z = 1.7 * n - 0.4 + 0.3 * torch.randn(tokens, channels, generator=generator, dtype=torch.float64)
    return n, z


def test_without_shrinkage_each_channel_is_its_own_least_squares_line():
    n, z = _data()
    gain, bias = fit_channels(ChannelMoments.of(n, z), torch.ones(6), torch.zeros(6), 0.0)
    for j in range(6):
        design = torch.stack([n[:, j], torch.ones_like(n[:, j])], dim=1)
        want = torch.linalg.lstsq(design, z[:, j:j + 1]).solution.squeeze(1)
        torch.testing.assert_close(torch.stack([gain[j], bias[j]]), want)
    gain_only, none = fit_channels(ChannelMoments.of(n, z), torch.ones(6), None, 0.0)
    assert none is None
    torch.testing.assert_close(gain_only, (n * z).sum(0) / (n * n).sum(0))


def test_the_moments_give_any_fits_error_and_a_large_shrinkage_keeps_the_values():
    n, z = _data()
    moments = ChannelMoments.of(n[:100], z[:100]) + ChannelMoments.of(n[100:], z[100:])
    gain, bias = torch.rand(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    assert moments.error(gain, bias) == pytest.approx(float((gain * n + bias - z).pow(2).sum()), rel=1e-12)
    assert moments.error(gain, None) == pytest.approx(float((gain * n - z).pow(2).sum()), rel=1e-12)
    fitted = fit_channels(moments, gain, bias, 0.0)
    assert moments.error(*fitted) < moments.error(gain, bias)
    shrunk = fit_channels(moments, gain, bias, 1e9)
    torch.testing.assert_close(shrunk[0], gain, atol=1e-6, rtol=0)
    torch.testing.assert_close(shrunk[1], bias, atol=1e-6, rtol=0)


def test_a_singular_channel_keeps_its_values():
    n, z = _data()
    n[:, 2] = 0.0  # no signal: [[0, 0], [0, N]] is singular without shrinkage
    gain, bias = fit_channels(ChannelMoments.of(n, z), torch.full((6,), 0.5), torch.full((6,), 0.1), 0.0)
    assert float(gain[2]) == 0.5 and float(bias[2]) == pytest.approx(0.1)
    assert torch.isfinite(gain).all() and torch.isfinite(bias).all()


def _teacher(model, num=32):
    return Teacher(model, "classification", make_sample(model, num=num, batch=4), 2.0, batch_size=None, device="cpu")


@pytest.fixture
def tuned_bert(tiny_model):
    """A tiny BERT with sub-layer 0 (MHA 0) pruned and tuned, its teacher, and masks."""
    model = sharpen(tiny_model("bert"))
    adapter = get_adapter(model)
    teacher = _teacher(model)
    sums = teacher.residual_sums(0)
    masks = partial_masks(adapter)
    kpwt(model, adapter, masks, teacher.batches, sums, 0)
    return model, adapter, teacher, sums, masks


def _norm_error(model, adapter, masks, teacher, sums, original, sublayer=0):
    """``Σ ||LN(h_student) − LN₀(Y_teacher)||²`` over the sample: the LayerNorm after ``sublayer`` as it is now
    for the student, with its ``original`` ``(gain, bias)`` for the teacher."""
    norm = following_norm(adapter, sublayer)
    total = 0.0
    for batch, target in zip(teacher.batches, sums):
        student = sublayer_activations(model, adapter, masks, batch, sublayer).y
        teacher_out = F.layer_norm(target, norm.normalized_shape, *original, norm.eps)
        total += float((norm(student) - teacher_out).detach().double().pow(2).sum())
    return total


def test_the_refit_lowers_the_layer_norms_error_against_the_teacher(tuned_bert):
    model, adapter, teacher, sums, masks = tuned_bert
    norm = following_norm(adapter, 0)
    assert norm is adapter.layers()[0].attn_norm  # post-LN: the LayerNorm right after the MHA
    original = (norm.weight.detach().clone(), norm.bias.detach().clone())
    before = _norm_error(model, adapter, masks, teacher, sums, original)
    fit = refit_norm(model, adapter, masks, teacher.batches, sums, 0, grid=(0.0,))
    assert fit.shrink == 0.0 and fit.held_out < 1.0
    write_norm(adapter, 0, fit)
    after = _norm_error(model, adapter, masks, teacher, sums, original)
    assert after < before
    with torch.no_grad():  # the fit is the sample's optimum: moving off it in any channel costs
        for parameter in (norm.weight, norm.bias):
            parameter[3] += 0.05
            assert _norm_error(model, adapter, masks, teacher, sums, original) > after
            parameter[3] -= 0.05


def test_moment_matching_gives_the_student_the_teachers_mean_and_variance_per_channel(tuned_bert):
    model, adapter, teacher, sums, masks = tuned_bert
    norm = following_norm(adapter, 0)
    original = (norm.weight.detach().clone(), norm.bias.detach().clone())
    fit = refit_norm(model, adapter, masks, teacher.batches, sums, 0, method="moments")
    assert fit.shrink is None and fit.held_out is not None
    write_norm(adapter, 0, fit)
    with torch.no_grad():
        student = torch.cat([norm(sublayer_activations(model, adapter, masks, batch, 0).y)
                             for batch in teacher.batches])
        target = torch.cat([F.layer_norm(sum_, norm.normalized_shape, *original, norm.eps) for sum_ in sums])
    torch.testing.assert_close(student.mean(0), target.mean(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(student.var(0), target.var(0), atol=1e-4, rtol=1e-4)
    noise = ChannelMoments.of(torch.randn(50, 3, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64))
    gains, _ = match_moments(noise, torch.tensor([1.0, -2.0, 0.5]), None)
    assert gains[1] < 0 < gains[0]  # a gain keeps its sign


def test_a_student_equal_to_its_teacher_keeps_the_layer_norm(tiny_model):
    model = sharpen(tiny_model("bert"))
    adapter = get_adapter(model)
    teacher = _teacher(model)
    norm = following_norm(adapter, 1)
    fit = refit_norm(model, adapter, Masks.ones(adapter), teacher.batches, teacher.residual_sums(1), 1)
    torch.testing.assert_close(fit.gain, norm.weight.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(fit.bias, norm.bias.detach(), atol=1e-5, rtol=0)


def test_pre_norm_layers_refit_the_next_sub_layers_input_norm(tiny_model):
    model = sharpen(tiny_model("modernbert"))
    adapter = get_adapter(model)
    layers = adapter.layers()
    assert following_norm(adapter, 0) is layers[0].ffn_norm
    assert following_norm(adapter, 1) is layers[1].attn_norm
    assert following_norm(adapter, 3) is None  # after the last layer: the family's final norm, not the adapter's


@pytest.mark.parametrize("method", ["least_squares", "moments"])
@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_the_pruner_refits_layer_norms_and_keeps_kpms_first_choice(tiny_model, family, method):
    plain_model = sharpen(tiny_model(family))
    plain = KPrunePruner().prune(make_problem(plain_model, rate=0.6))
    model = sharpen(tiny_model(family))
    problem = make_problem(model, rate=0.6)
    result = KPrunePruner(norm_refit=method).prune(problem)
    assert torch.equal(result.masks.heads[0], plain.masks.heads[0])  # sub-layer 0 is chosen before any re-fit
    norms = {name for name, _ in model.named_parameters() if "norm" in name.lower()}
    changed = {name for name, value in model.named_parameters()
               if not torch.equal(value, dict(plain_model.named_parameters())[name])}
    assert changed & norms  # some LayerNorm moved
    fits = result.settings["norm_refit"]
    assert sorted(fits, key=int) == [str(s) for s in range(4 if family == "bert" else 3)]
    assert len([note for note in result.notes if note.startswith("pruner.norm_refit:")]) == 1
    assert problem.flops.total(result.masks.kept()) <= problem.budget * (1 + 1e-9)


def test_norm_refit_needs_tuning_and_a_known_method():
    with pytest.raises(UserError, match="pruner.norm_refit=moments needs pruner.tune=true"):
        KPrunePruner(norm_refit="moments", tune=False)
    with pytest.raises(UserError, match="pruner.norm_refit=True: choose false, least_squares or moments"):
        KPrunePruner(norm_refit=True)


def test_norm_refit_runs_with_bf16_passes(tiny_model):
    model = sharpen(tiny_model("bert"))
    pruner = KPrunePruner(norm_refit="least_squares", autocast="bf16", autocast_scope="all")
    result = pruner.prune(make_problem(model, rate=0.6))
    assert len(result.settings["norm_refit"]) == 4
    norms = [value for name, value in model.named_parameters() if "LayerNorm" in name]
    assert norms and all(torch.isfinite(value).all() and value.dtype == torch.float32 for value in norms)
