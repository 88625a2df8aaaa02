"""The weight-magnitude floor: importance by hand, budget, and a global per-FLOP threshold."""

from __future__ import annotations

import pytest
import torch
from kprune_helpers import TINY_FLOPS, make_problem, make_sample

from kprune_cli.models.adapters import get_adapter
from kprune_cli.pruners.magnitude.pruner import MagnitudePruner, unit_magnitudes


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_unit_magnitudes_sum_the_weights_each_unit_owns(family, tiny_model):
    parts = get_adapter(tiny_model(family)).layers()[0]
    head = slice(8, 16)  # head 1 of size 8
    expected_head = sum(float(w[head].pow(2).sum()) for w in (p.weight for p in parts.head_projections))
    expected_head += float(parts.attn_out.weight[:, head].pow(2).sum())
    expected_neuron = float(parts.ffn_in.weight[5].pow(2).sum() + parts.ffn_out.weight[:, 5].pow(2).sum())

    assert float(unit_magnitudes(parts, "mha")[1]) == pytest.approx(expected_head, rel=1e-5)
    assert float(unit_magnitudes(parts, "ffn")[5]) == pytest.approx(expected_neuron, rel=1e-5)


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_keeps_the_largest_units_per_flop_within_budget(rate, tiny_model):
    model = tiny_model("bert")
    problem = make_problem(model, rate=rate, sample=make_sample(model))
    masks = MagnitudePruner().prune(problem).masks

    kept = TINY_FLOPS.total(masks.kept())
    assert kept <= problem.budget * (1 + 1e-9)
    assert problem.budget - kept < TINY_FLOPS.head  # a prefix of the score order misses by less than one unit
    scores, keep = [], []
    for parts, heads, neurons in zip(get_adapter(model).layers(), masks.heads, masks.neurons):
        scores += [unit_magnitudes(parts, "mha") / TINY_FLOPS.head, unit_magnitudes(parts, "ffn") / TINY_FLOPS.neuron]
        keep += [heads.bool(), neurons.bool()]
    scores, keep = torch.cat(scores), torch.cat(keep)
    assert scores[keep].min() >= scores[~keep].max()


def test_touches_no_weights(tiny_model):
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    MagnitudePruner().prune(make_problem(model, rate=0.5, sample=make_sample(model)))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
