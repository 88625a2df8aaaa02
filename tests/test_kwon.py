"""Kwon et al. on tiny models: Fisher gradients, mask tuning, and the whole one-shot pruner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from kprune_helpers import TASK_OF_HEAD, TINY_FLOPS, make_problem, make_sample, partial_masks, sharpen
from rich.progress import Progress

from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.pruners.common.reconstruction import TokenBatch, sublayer_activations
from kprune_cli.pruners.kwon.fisher import fisher_importance, labelled_batches, mask_gradients
from kprune_cli.pruners.kwon.pruner import KwonPruner
from kprune_cli.pruners.kwon.tune import (
    MAX_SCALE,
    LayerwiseTuning,
    first_token_only,
    first_tokens,
    teacher_budget,
    tune_sublayer,
)
from kprune_cli.runtime.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def labelled(sample, head: str = "classification", seed: int = 0):
    """Add random gold targets of a ``head`` ("classification", "regression", "qa") to ``sample``'s batches."""
    generator = torch.Generator().manual_seed(seed)
    for batch in sample.batches:
        size = batch["input_ids"].shape[0]
        if head == "classification":
            batch["labels"] = torch.randint(0, 2, (size,), generator=generator)
        elif head == "regression":
            batch["labels"] = torch.randn(size, generator=generator)
        else:
            lengths = batch["attention_mask"].sum(dim=1)
            start = (torch.rand(size, generator=generator) * lengths).long()
            batch["start_positions"] = start
            batch["end_positions"] = torch.minimum(start + 2, lengths - 1)
    return sample


def _model_and_problem(tiny_model, family="bert", head="classification", rate=0.5, num=16):
    model = sharpen(tiny_model(family, "qa" if head == "qa" else "classification",
                               num_labels=1 if head == "regression" else 2))
    sample = labelled(make_sample(model, num=num), head)
    return model, make_problem(model, task=TASK_OF_HEAD[head], rate=rate, sample=sample)


def _unit_masks(masks):
    return [mask for pair in zip(masks.heads, masks.neurons) for mask in pair]


# --- Fisher ---------------------------------------------------------------------------------------

def test_mask_gradients_match_finite_differences(tiny_model):
    model = sharpen(tiny_model("bert")).double()
    adapter = get_adapter(model)
    batches = labelled_batches(labelled(make_sample(model)), batch_size=5, device="cpu")
    grads = mask_gradients(model, adapter, batches)
    assert [tuple(grads[s].shape) for s in range(4)] == [(len(batches), 4), (len(batches), 64)] * 2

    def loss(batch, sublayer, unit, delta):
        masks = Masks.ones(adapter)
        masks = Masks([m.double() for m in masks.heads], [m.double() for m in masks.neurons])
        _unit_masks(masks)[sublayer][unit] += delta
        with torch.no_grad(), apply_masks(adapter, masks):
            return float(model(**batch).loss)

    eps = 1e-5
    for sublayer, unit in ((0, 1), (1, 7), (2, 3), (3, 40)):
        for b, batch in enumerate(batches):
            numeric = (loss(batch, sublayer, unit, eps) - loss(batch, sublayer, unit, -eps)) / (2 * eps)
            assert float(grads[sublayer][b, unit]) == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    importance = fisher_importance(grads)
    torch.testing.assert_close(importance[2], grads[2].double().pow(2).sum(dim=0))


def test_fisher_needs_gold_targets(tiny_model):
    model = tiny_model("bert")
    with pytest.raises(UserError, match="gold targets"):
        labelled_batches(make_sample(model), batch_size=8, device="cpu")


def test_labelled_batches_split_targets_with_inputs(tiny_model):
    model = tiny_model("bert")
    sample = labelled(make_sample(model, num=16, batch=8), "qa")
    batches = labelled_batches(sample, batch_size=3, device="cpu")  # 16 sequences in draw order, 3 by 3
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 3, 3, 3, 1]
    starts = torch.cat([b["start_positions"] for b in batches])
    torch.testing.assert_close(starts, torch.cat([b["start_positions"] for b in sample.batches]))


# --- mask tuning ----------------------------------------------------------------------------------

def _tuning_setup(tiny_model):
    model = sharpen(tiny_model("bert"), 3.0)
    adapter = get_adapter(model)
    sample = make_sample(model, num=24)
    batches = [TokenBatch(inputs, inputs["attention_mask"].bool())
               for inputs in (sample.model_inputs(batch, "cpu") for batch in sample.batches)]
    masks = partial_masks(adapter)
    return model, adapter, batches, masks


def _targets(model, adapter, reference, batches, sublayer) -> list[torch.Tensor]:
    return [sublayer_activations(model, adapter, reference, batch, sublayer).y for batch in batches]


def _reconstruction_error(model, adapter, masks, reference, batches, sublayer) -> float:
    student = _targets(model, adapter, masks, batches, sublayer)
    target = _targets(model, adapter, reference, batches, sublayer)
    return sum(float((a - b).pow(2).sum()) for a, b in zip(student, target))


def test_tuning_reduces_the_reconstruction_error_of_every_sublayer(tiny_model):
    model, adapter, batches, masks = _tuning_setup(tiny_model)
    reference = Masks.ones(adapter)
    for sublayer in range(4):
        before = _reconstruction_error(model, adapter, masks, reference, batches, sublayer)
        pruned = _unit_masks(masks)[sublayer] == 0
        notes = tune_sublayer(model, adapter, masks, batches, _targets(model, adapter, reference, batches, sublayer),
                              sublayer)
        after = _reconstruction_error(model, adapter, masks, reference, batches, sublayer)
        assert notes == []
        assert after < before
        mask = _unit_masks(masks)[sublayer]
        assert torch.all(mask[pruned] == 0)  # pruned units stay pruned
        assert not torch.all(mask[~pruned] == 1)  # survivors got real values


@pytest.mark.parametrize("teacher", ["original", "pruned"])
def test_layerwise_tuning_equals_tuning_from_the_embeddings(tiny_model, teacher):
    model, adapter, batches, masks = _tuning_setup(tiny_model)
    reference = Masks.ones(adapter)
    if teacher == "pruned":
        reference.heads[1][3] = 0.0
        reference.neurons[0][:10] = 0.0
    expected = masks.clone()
    for sublayer in range(4):  # every pass from the embeddings, on all real tokens
        targets = _targets(model, adapter, reference, batches, sublayer)
        tune_sublayer(model, adapter, expected, batches, targets, sublayer)
    tuning = LayerwiseTuning(model, adapter, masks, reference, batches, "qa")
    assert tuning.tune_layer(0) == [] and tuning.tune_layer(1) == []
    for a, b in zip(_unit_masks(masks), _unit_masks(expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="bottom-up"):
        tuning.tune_layer(0)


def test_the_last_ffn_of_a_sequence_model_is_reconstructed_on_the_first_token(tiny_model):
    model, adapter, batches, masks = _tuning_setup(tiny_model)
    assert first_token_only(3, 4, "classification") and first_token_only(3, 4, "regression")
    assert not first_token_only(3, 4, "qa") and not first_token_only(2, 4, "classification")
    sums = _targets(model, adapter, masks, batches, 3)  # all real tokens
    selected, rows = first_tokens(batches, sums)
    assert all(b.token_mask[:, 0].all() and not b.token_mask[:, 1:].any() for b in selected)
    for got, expected in zip(rows, _targets(model, adapter, masks, selected, 3)):
        torch.testing.assert_close(got, expected)


def test_tuning_rejects_scales_beyond_the_bound(tiny_model):
    model, adapter, batches, masks = _tuning_setup(tiny_model)
    targets = _targets(model, adapter, Masks.ones(adapter), batches, 3)
    with torch.no_grad():  # the survivors of FFN_1 contribute 1000x less: matching needs huge scales
        model.bert.encoder.layer[1].output.dense.weight.mul_(1e-3)
    before = masks.neurons[1].clone()
    notes = tune_sublayer(model, adapter, masks, batches, targets, 3)
    assert len(notes) == 1 and f"exceeds {MAX_SCALE:g}" in notes[0] and "sub-layer 3" in notes[0]
    assert torch.equal(masks.neurons[1], before)


def test_teacher_budget_is_the_square_root_of_the_kept_fraction():
    assert teacher_budget(64.0, 100.0) == pytest.approx(80.0)
    assert teacher_budget(100.0, 100.0) == pytest.approx(100.0)


# --- the pruner -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "distilbert"])
@pytest.mark.parametrize("head", ["classification", "regression", "qa"])
def test_runs_for_every_task_head_and_family(tiny_model, family, head):
    model, problem = _model_and_problem(tiny_model, family, head, rate=0.5)
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    result = KwonPruner(gradient_batch=4).prune(problem)
    assert [mask.shape for mask in result.masks.heads] == [(4,), (4,)]
    assert [mask.shape for mask in result.masks.neurons] == [(64,), (64,)]
    assert 0 < TINY_FLOPS.total(result.masks.kept()) <= problem.budget
    assert set(result.timing) == {"fisher", "search", "rearrange", "tune"}
    assert all(torch.isfinite(mask).all() for mask in _unit_masks(result.masks))
    assert all(torch.equal(weights[key], value) for key, value in model.state_dict().items())  # masks only


@pytest.mark.parametrize("rate", [0.2, 0.6, 0.9])
@pytest.mark.parametrize("teacher", ["intermediate", "original"])
def test_budget_respected_and_deterministic(tiny_model, rate, teacher):
    runs = []
    for _ in range(2):
        _, problem = _model_and_problem(tiny_model, rate=rate)
        runs.append(KwonPruner(gradient_batch=4, teacher=teacher).prune(problem))
        assert TINY_FLOPS.total(runs[-1].masks.kept()) <= problem.budget * (1 + 1e-9)
    assert all(torch.equal(a, b) for a, b in zip(_unit_masks(runs[0].masks), _unit_masks(runs[1].masks)))
    assert runs[0].notes == runs[1].notes


def test_steps_can_be_switched_off(tiny_model):
    _, problem = _model_and_problem(tiny_model, rate=0.6)
    plain = KwonPruner(gradient_batch=4, rearrange=False, tune=False).prune(problem)
    assert all(torch.all((mask == 0) | (mask == 1)) for mask in _unit_masks(plain.masks))
    rearranged = KwonPruner(gradient_batch=4, tune=False).prune(problem)
    assert plain.masks.kept() == rearranged.masks.kept()  # rearrangement keeps per-layer counts
    tuned = KwonPruner(gradient_batch=4, rearrange=False).prune(problem)
    for a, b in zip(_unit_masks(plain.masks), _unit_masks(tuned.masks)):
        assert torch.equal(a != 0, b != 0)  # tuning changes values, not which units survive


def test_rate_zero_keeps_every_unit_and_the_outputs(tiny_model):
    model, problem = _model_and_problem(tiny_model, rate=0.0)
    result = KwonPruner(gradient_batch=4).prune(problem)
    assert all(torch.all(mask != 0) for mask in _unit_masks(result.masks))
    batch = problem.sample.model_inputs(problem.sample.batches[0], "cpu")
    with torch.no_grad():
        dense = model(**batch).logits
        with apply_masks(problem.adapter, result.masks):
            masked = model(**batch).logits
    torch.testing.assert_close(masked, dense, rtol=0, atol=1e-4)


def test_uses_a_given_progress(tiny_model):
    _, problem = _model_and_problem(tiny_model, rate=0.5)
    with Progress(disable=True) as progress:
        KwonPruner(gradient_batch=4).prune(problem, progress=progress)
        assert [task.completed for task in progress.tasks] == [4, 4, 2]  # batches, sub-layers, layers


@pytest.mark.parametrize("kwargs", [{"gradient_batch": 0}, {"micro_batch_size": 0}, {"teacher": "dense"}])
def test_rejects_bad_settings(kwargs):
    with pytest.raises(UserError):
        KwonPruner(**kwargs)


def test_pruner_config(tmp_path):
    (tmp_path / "main.yaml").write_text("defaults:\n  - pruner: kwon\n  - _self_\nseed: 0\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        config = compose("main", overrides=[f"hydra.searchpath=[file://{CONFIGS}]"])
    pruner = instantiate(config.pruner)
    assert isinstance(pruner, KwonPruner) and pruner.name == "kwon"
    # gradient_batch None: the task's official gradient batch (tests/test_official_settings.py)
    assert (pruner.gradient_batch, pruner.micro_batch_size, pruner.rearrange, pruner.tune, pruner.teacher) == (
        None, None, True, True, "intermediate")
