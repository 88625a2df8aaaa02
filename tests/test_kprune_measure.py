"""Knowledge measurement: predictive knowledge against finite differences, representational
knowledge against a by-hand forward pass, and the per-FLOP scores."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kprune_helpers import TASK_OF_HEAD, TINY_FLOPS, make_sample, partial_masks, sharpen

from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.pruners.common.hooks import scale_inputs
from kprune_cli.pruners.common.teacher import Teacher, distillation_loss
from kprune_cli.pruners.kprune.measure import FP16_LOSS_SCALE, Knowledge, measure, scaled_gradients, score
from kprune_cli.tasks.calibration import DRAW_INDEX
from kprune_cli.tasks.spec import TASKS


def _per_sample_losses(model, adapter, masks, teacher, proj=None, scale=None) -> torch.Tensor:
    """Per-sample distillation losses over the whole sample, optionally scaling ``proj``'s input."""
    losses = []
    with torch.no_grad(), apply_masks(adapter, masks), scale_inputs({proj: scale} if proj is not None else {}):
        for batch in teacher.batches:
            outputs = model(**batch.inputs)
            losses.append(distillation_loss(outputs, batch.target, teacher.kind, teacher.temperature,
                                            batch.token_mask))
    return torch.cat(losses)  # (samples,)


def _fd_knowledge(model, adapter, masks, teacher, proj, columns, gradient_batch, eps=1e-5) -> float:
    """½ · Σ over gradient batches (``draw index // gradient_batch``) of the squared central difference
    of the batch-mean loss, over the number of samples; averaged over ``columns``."""
    draw_index = torch.cat([batch.draw_index for batch in teacher.batches])  # (samples,)
    groups = draw_index // gradient_batch
    values = []
    for column in columns:
        scales = []
        for sign in (1.0, -1.0):
            scale = torch.ones(proj.in_features, dtype=torch.float64)
            scale[column] += sign * eps
            scales.append(_per_sample_losses(model, adapter, masks, teacher, proj, scale))
        grad = (scales[0] - scales[1]) / (2 * eps)  # (samples,)
        batch_means = torch.stack([grad[groups == g].mean() for g in groups.unique()])
        values.append(0.5 * batch_means.pow(2).sum() / len(grad))
    return float(torch.stack(values).mean())


def _shuffled_draw_order(sample, seed: int = 0):
    """``sample`` with a random draw order recorded, as a drawn sample has."""
    order = torch.randperm(sample.num_examples, generator=torch.Generator().manual_seed(seed))
    for batch, part in zip(sample.batches, order.split([int(b["input_ids"].shape[0]) for b in sample.batches])):
        batch[DRAW_INDEX] = part
    return sample


@pytest.mark.parametrize("head, gradient_batch", [("classification", 1), ("regression", 1), ("qa", 1),
                                                  ("classification", 3), ("regression", 4), ("qa", 32)])
def test_predictive_knowledge_matches_finite_differences(tiny_model, head, gradient_batch):
    model = sharpen(tiny_model("bert", "qa" if head == "qa" else "classification",
                               num_labels=1 if head == "regression" else 2).double())
    adapter = get_adapter(model)
    sample = _shuffled_draw_order(make_sample(model, num=10, batch=4))
    teacher = Teacher(model, TASKS[TASK_OF_HEAD[head]].kind, sample, temperature=2.0, batch_size=None,
                      device="cpu", keep_model=False)
    masks = Masks.ones(adapter)
    masks.heads[0][1] = 0.0  # prune a head of sub-layer 0 so the student differs from the teacher
    masks.neurons[0][:20] = 0.0
    knowledge = measure(model, adapter, masks, teacher, from_sublayer=1, gradient_batch=gradient_batch)

    layers = adapter.layers()
    for sublayer, proj, unit, columns in (
        (1, layers[0].ffn_out, 30, [30]),
        (3, layers[1].ffn_out, 5, [5]),
        (2, layers[1].attn_out, 2, list(range(16, 24))),  # head 2: its d_h = 8 columns
    ):
        expected = _fd_knowledge(model, adapter, masks, teacher, proj, columns, gradient_batch)
        got = float(knowledge.predictive[sublayer][unit])
        assert expected > 1e-10
        assert got == pytest.approx(expected, rel=1e-4)


def test_predictive_knowledge_is_zero_when_student_equals_teacher(tiny_model):
    model = tiny_model("bert")
    adapter = get_adapter(model)
    teacher = Teacher(model, "classification", make_sample(model), 2.0, batch_size=None, device="cpu",
                      keep_model=False)
    knowledge = measure(model, adapter, Masks.ones(adapter), teacher, from_sublayer=0)
    assert sorted(knowledge.predictive) == [0, 1, 2, 3]
    for sublayer, predictive in knowledge.predictive.items():
        assert torch.all(predictive.abs() < 1e-20)
        assert torch.all(knowledge.representational[sublayer] > 0)


def _by_hand_activations(model, inputs) -> dict[int, torch.Tensor]:
    """The output projections' inputs of every sub-layer of a tiny BERT, computed from its weights."""
    hidden_states = model(**inputs, output_hidden_states=True).hidden_states
    pad = (1.0 - inputs["attention_mask"][:, None, None, :].to(hidden_states[0].dtype)) * -1e9
    activations = {}
    for index, layer in enumerate(model.bert.encoder.layer):
        h = hidden_states[index]  # (batch, seq, d)
        batch, seq, _ = h.shape
        attn = layer.attention.self

        def split(x):
            return x.view(batch, seq, 4, 8).transpose(1, 2)  # (batch, heads, seq, d_h)

        probs = torch.softmax(split(attn.query(h)) @ split(attn.key(h)).transpose(-1, -2) / math.sqrt(8) + pad, -1)
        context = (probs @ split(attn.value(h))).transpose(1, 2).reshape(batch, seq, 32)  # (batch, seq, heads * d_h)
        attended = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + h)
        activations[2 * index] = context
        activations[2 * index + 1] = F.gelu(layer.intermediate.dense(attended))  # (batch, seq, neurons)
    return activations


def test_representational_knowledge_matches_direct_computation(tiny_model):
    model = tiny_model("bert").double()
    adapter = get_adapter(model)
    sample = make_sample(model, num=10, batch=4)
    teacher = Teacher(model, "classification", sample, 2.0, batch_size=None, device="cpu", keep_model=False)
    knowledge = measure(model, adapter, Masks.ones(adapter), teacher, from_sublayer=0)

    energy = {s: 0.0 for s in range(4)}
    tokens = 0
    with torch.no_grad():
        for batch in teacher.batches:
            for s, activation in _by_hand_activations(model, batch.inputs).items():
                energy[s] = energy[s] + activation[batch.token_mask].pow(2).sum(0)
            tokens += int(batch.token_mask.sum())
    layers = adapter.layers()
    for s in range(4):
        proj = layers[s // 2].out_proj("mha" if s % 2 == 0 else "ffn")
        per_column = energy[s] / tokens * proj.weight.pow(2).mean(0)
        expected = per_column.view(4, 8).mean(1) if s % 2 == 0 else per_column
        torch.testing.assert_close(knowledge.representational[s], expected.detach(), rtol=1e-6, atol=0)


def test_measurement_does_not_depend_on_micro_batching(tiny_model):
    model = sharpen(tiny_model("bert").double())
    adapter = get_adapter(model)
    sample = _shuffled_draw_order(make_sample(model, num=12, batch=12))
    masks = Masks.ones(adapter)
    masks.heads[0][0] = 0.0
    results = [
        measure(model, adapter, masks, Teacher(model, "classification", sample, 2.0, size, "cpu", keep_model=False), 1,
                gradient_batch=4)
        for size in (None, 5)
    ]
    for s in range(1, 4):
        assert results[0].predictive[s].abs().max() > 0
        torch.testing.assert_close(results[0].predictive[s], results[1].predictive[s], rtol=1e-8, atol=0)
        torch.testing.assert_close(results[0].representational[s], results[1].representational[s], rtol=1e-8, atol=0)


def test_gradient_batches_average_before_squaring(tiny_model):
    """Squared batch-mean gradients are at most 1/size of the per-sample squares (Jensen), less where signs cancel."""
    model = sharpen(tiny_model("bert").double())
    adapter = get_adapter(model)
    teacher = Teacher(model, "classification", _shuffled_draw_order(make_sample(model, num=16)), 2.0, None, "cpu",
                      keep_model=False)
    masks = Masks.ones(adapter)
    masks.neurons[0][::2] = 0.0
    per_sample, batched = (measure(model, adapter, masks, teacher, 2, gradient_batch=size) for size in (1, 8))
    for s in (2, 3):
        assert torch.all(batched.predictive[s] > 0)
        assert torch.all(batched.predictive[s] <= per_sample.predictive[s] / 8 * (1 + 1e-9))
        assert (batched.predictive[s] < 0.5 * per_sample.predictive[s] / 8).any()  # cancellation shows
        torch.testing.assert_close(batched.representational[s], per_sample.representational[s])


def test_measure_leaves_parameters_trainable_and_hooks_removed(tiny_model):
    model = tiny_model("bert")
    adapter = get_adapter(model)
    teacher = Teacher(model, "classification", make_sample(model), 2.0, None, "cpu", keep_model=False)
    measure(model, adapter, Masks.ones(adapter), teacher, 0)
    assert all(param.requires_grad for param in model.parameters())
    assert all(not module._forward_pre_hooks for module in model.modules())


def test_scores_are_per_flop_and_skip_pruned_units(tiny_model):
    adapter = get_adapter(tiny_model("bert"))
    masks = Masks.ones(adapter)
    masks.heads[1][3] = 0.0
    knowledge = Knowledge(
        from_sublayer=2,
        predictive={2: torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64),
                    3: torch.linspace(0, 1, 64, dtype=torch.float64)},
        representational={2: torch.tensor([10.0, 0.0, 30.0, 40.0], dtype=torch.float64),
                          3: torch.linspace(1, 2, 64, dtype=torch.float64)},
    )
    scores = score(knowledge, masks, TINY_FLOPS, lambda_pred=1.0, lambda_rep=0.5, mu=64.0)
    expected_heads = 64.0 * (0.5 * knowledge.representational[2] + knowledge.predictive[2]) / TINY_FLOPS.head
    torch.testing.assert_close(scores[2][:3], expected_heads[:3])
    assert scores[2][3] == float("-inf")
    expected_neurons = (0.5 * knowledge.representational[3] + knowledge.predictive[3]) / TINY_FLOPS.neuron
    torch.testing.assert_close(scores[3], expected_neurons)


def test_loss_scaling_keeps_float16_gradients_that_would_flush_to_zero():
    x = torch.ones(4, dtype=torch.float16, requires_grad=True)

    def forward():  # d loss / d x = 2e-8 per element: below float16's smallest subnormal (6e-8)
        y = x * torch.tensor(1e-4, dtype=torch.float16)
        return y.float().pow(2), [x]

    _, plain, _ = scaled_gradients(forward, None)
    _, scaled, scale = scaled_gradients(forward, FP16_LOSS_SCALE)
    assert float(plain[0].abs().max()) == 0.0
    assert scale == FP16_LOSS_SCALE
    torch.testing.assert_close(scaled[0].float() / scale, torch.full((4,), 2e-8), rtol=2e-2, atol=0)


def test_loss_scaling_halves_the_scale_until_the_gradients_fit_float16():
    x = torch.ones(4, dtype=torch.float16, requires_grad=True)
    runs = []

    def forward():  # d loss / d x = 1000: times 2^16 it overflows float16 (max 65504)
        runs.append(1)
        return (x.float() * 1000.0), [x]

    _, grads, scale = scaled_gradients(forward, FP16_LOSS_SCALE)
    assert scale == 64.0 and len(runs) == 11  # 2^16 -> 2^6, each overflow redone
    assert torch.equal(grads[0].float() / scale, torch.full((4,), 1000.0))


def test_float16_measurement_with_loss_scaling_stays_near_float32(tiny_model):
    # On this tiny model the float16 forward's round-off, not gradient underflow, dominates the
    # difference (the isolated tests above show the scaling itself); this checks the scaled path end to end.
    model = sharpen(tiny_model("bert"), 3.0)
    adapter = get_adapter(model)
    teacher = Teacher(model, "classification", make_sample(model), 2.0, None, "cpu", keep_model=False)
    masks = partial_masks(adapter)
    exact = measure(model, adapter, masks, teacher, 0)
    scaled = measure(model, adapter, masks, teacher, 0, autocast=torch.float16)
    for s, value in exact.predictive.items():
        assert torch.isfinite(scaled.predictive[s]).all()
        assert float((scaled.predictive[s] - value).norm() / value.norm()) < 0.5
