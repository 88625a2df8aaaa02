"""The fast K-prune schedule: passes that start at the target layer from cached hidden states give
the same masks and tuned weights as the reference schedule that runs everything from the embeddings."""

from __future__ import annotations

import pytest
import torch
from kprune_helpers import DEVICES, TASK_OF_HEAD, TINY_FLOPS, make_problem, make_sample, sharpen

from benchmarks.reference import ReferenceKPrune, kpms_scan, truncated_teacher_sums
from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.pruners.common.kpms import kpms
from kprune_cli.pruners.common.teacher import ResidualSums, Teacher
from kprune_cli.pruners.common.window import LayerWindow, advance, encoder_inputs
from kprune_cli.pruners.kprune.measure import measure
from kprune_cli.pruners.kprune.pruner import KPrunePruner
from kprune_cli.runtime.errors import UserError


def _pruned_masks(adapter) -> Masks:
    masks = Masks.ones(adapter)
    masks.heads[0][1] = 0.0
    masks.neurons[0][::3] = 0.0
    masks.heads[1][2] = 0.0
    return masks


def _inputs(model):
    sample = make_sample(model, num=12, batch=5)
    return [sample.model_inputs(batch, "cpu") for batch in sample.batches]


@pytest.mark.parametrize("family", ["bert", "distilbert", "electra"])
@pytest.mark.parametrize("head", ["classification", "qa"])
def test_layer_window_reproduces_the_full_forward_pass(tiny_model, family, head):
    model = sharpen(tiny_model(family, head))
    adapter = get_adapter(model)
    masks = _pruned_masks(adapter)
    inputs = _inputs(model)
    with torch.no_grad(), apply_masks(adapter, masks):
        full = [model(**batch, output_hidden_states=True) for batch in inputs]
    entering = encoder_inputs(model, adapter, inputs)
    second = advance(model, adapter, masks, 0, inputs, entering)
    with torch.no_grad(), apply_masks(adapter, masks), LayerWindow(model, adapter, 1) as window:
        outputs = [window(batch, hidden) for batch, hidden in zip(inputs, second)]
    key = "start_logits" if head == "qa" else "logits"
    for reference, x0, x1, output in zip(full, entering, second, outputs):
        assert torch.equal(reference.hidden_states[0], x0)
        assert torch.equal(reference.hidden_states[1], x1)
        assert torch.equal(reference[key], output[key])


def test_layer_window_restores_the_model_also_on_errors(tiny_model):
    model = tiny_model("bert")
    adapter = get_adapter(model)
    layers = adapter.layer_modules()
    with pytest.raises(ZeroDivisionError):
        with LayerWindow(model, adapter, 1, 2):
            assert len(adapter.layer_modules()) == 1
            raise ZeroDivisionError
    assert adapter.layer_modules() is layers and len(layers) == 2
    assert all(not module._forward_pre_hooks and not module._forward_hooks for module in model.modules())


def test_measure_from_cached_hidden_states_equals_measure_from_the_embeddings(tiny_model):
    model = sharpen(tiny_model("bert").double())
    adapter = get_adapter(model)
    teacher = Teacher(model, "classification", make_sample(model), 2.0, batch_size=5, device="cpu",
                      keep_model=False)
    masks = _pruned_masks(adapter)
    masks.heads[1][:] = 1.0  # sub-layers >= 2 undecided, as in the schedule
    hidden = advance(model, adapter, masks, 0, [b.inputs for b in teacher.batches],
                     encoder_inputs(model, adapter, [b.inputs for b in teacher.batches]))
    fast = measure(model, adapter, masks, teacher, 2, hidden)
    slow = measure(model, adapter, masks, teacher, 2)
    for s in (2, 3):
        assert fast.predictive[s].abs().max() > 0
        torch.testing.assert_close(fast.predictive[s], slow.predictive[s], rtol=1e-12, atol=0)
        torch.testing.assert_close(fast.representational[s], slow.representational[s], rtol=1e-12, atol=0)


def test_residual_sums_walk_up_like_truncated_passes_and_restart_for_an_earlier_layer(tiny_model):
    model = tiny_model("distilbert")
    teacher = Teacher(model, "classification", make_sample(model), 2.0, batch_size=5, device="cpu",
                      keep_model=False)
    sums = ResidualSums(model, teacher.batches)
    for layer in (0, 1, 0):
        expected = truncated_teacher_sums(model, teacher.batches, layer)
        for kind, sublayer in (("mha", 2 * layer), ("ffn", 2 * layer + 1)):
            for got, want in zip(sums(sublayer), expected[kind]):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["bert", "distilbert"])
@pytest.mark.parametrize("head", ["classification", "qa"])
def test_fast_schedule_matches_the_reference(tiny_model, family, head, device):
    results = []
    for pruner in (KPrunePruner(micro_batch_size=5), ReferenceKPrune(KPrunePruner(micro_batch_size=5))):
        model = sharpen(tiny_model(family, head))
        problem = make_problem(model, task=TASK_OF_HEAD[head], rate=0.6, device=device)
        results.append((pruner.prune(problem), {key: value.cpu() for key, value in model.state_dict().items()}))
    (fast, fast_weights), (reference, reference_weights) = results
    assert any((mask == 0).any() for mask in fast.masks.heads + fast.masks.neurons)
    for a, b in zip(fast.masks.heads + fast.masks.neurons, reference.masks.heads + reference.masks.neurons):
        assert torch.equal(a, b)
    original = sharpen(tiny_model(family, head)).state_dict()
    assert any(not torch.equal(value, original[key]) for key, value in fast_weights.items())  # KPWT tuned
    for key, value in fast_weights.items():
        torch.testing.assert_close(value, reference_weights[key], rtol=0, atol=1e-5)


def test_kpms_scan_equals_kpms():
    generator = torch.Generator().manual_seed(0)
    scores = {s: torch.randn(4 if s % 2 == 0 else 64, generator=generator, dtype=torch.float64) for s in range(2, 6)}
    scores[3][:5] = scores[3][5]  # ties
    scores[4][1] = float("-inf")  # already pruned
    for budget in (0.0, TINY_FLOPS.neuron * 10, TINY_FLOPS.head * 3 + TINY_FLOPS.neuron * 70, 1e12):
        fast, scan = kpms(scores, TINY_FLOPS, budget), kpms_scan(scores, TINY_FLOPS, budget)
        assert all(torch.equal(fast[s], scan[s]) for s in scores)


def test_reference_is_iterative_only():
    with pytest.raises(ValueError):
        ReferenceKPrune(KPrunePruner(iterative=False))


def test_autocast_measurement_keeps_most_decisions(tiny_model):
    keeps = []
    for autocast in (False, "bf16"):
        model = sharpen(tiny_model("bert"))
        problem = make_problem(model, rate=0.5, sample=make_sample(model, num=48))
        masks = KPrunePruner(autocast=autocast).prune(problem).masks
        keeps.append(torch.cat(masks.heads + masks.neurons) != 0)
    assert float((keeps[0] == keeps[1]).float().mean()) >= 0.95


@pytest.mark.parametrize("autocast, inside", [(False, "sdpa"), ("bf16", "eager")])
def test_cpu_autocast_measures_with_eager_attention_and_restores_it(tiny_model, autocast, inside):
    model = sharpen(tiny_model("bert"))
    model.config._attn_implementation = "sdpa"
    seen = []
    hook = get_adapter(model).layer_modules()[0].register_forward_pre_hook(
        lambda module, args: seen.append(model.config._attn_implementation))
    problem = make_problem(model, rate=0.5, sample=make_sample(model, num=8))
    KPrunePruner(autocast=autocast, tune=False).prune(problem)
    hook.remove()
    assert inside in seen and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("value", [True, "fp8", "bfloat16"])
def test_rejects_unknown_autocast(value):
    with pytest.raises(UserError, match="autocast"):
        KPrunePruner(autocast=value)


@pytest.mark.slow
def test_fast_schedule_matches_the_reference_on_minilm_mrpc(shared_dir):
    from benchmarks.cases import minilm_mrpc

    runs = []
    for pruner in (KPrunePruner(), ReferenceKPrune(KPrunePruner())):
        case = minilm_mrpc(600, shared_dir=shared_dir, num_layers=3)
        result = pruner.prune(case.problem())
        runs.append((result.masks, case.model.state_dict()))
    (fast, fast_weights), (reference, reference_weights) = runs
    assert case.source != "random" and 0 < sum(int(m.sum()) for m in fast.neurons) < 3 * 1536
    for a, b in zip(fast.heads + fast.neurons, reference.heads + reference.neurons):
        assert torch.equal(a, b)
    for key, value in fast_weights.items():
        torch.testing.assert_close(value, reference_weights[key], rtol=0, atol=1e-5)
