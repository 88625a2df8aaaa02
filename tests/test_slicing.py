"""Physical pruning: a pruned copy computes what the masked model computes, with fewer weights."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES

from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.loading import count_parameters
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.models.slicing import prune_physically

HEADS = ("classification", "qa")


def make_masks(adapter, case: str, seed: int = 0) -> Masks:
    """Random keep-masks with both zeros and survivors in every sub-layer, except that the attention
    of layer 0 and the FFN of layer 1 are emptied ("binary", "real": survivors scaled in [0.5, 1.5)),
    or every sub-layer empty ("empty")."""
    generator = torch.Generator().manual_seed(seed)
    masks = Masks.ones(adapter)
    for mask in masks.heads + masks.neurons:
        mask.copy_((torch.rand(mask.shape, generator=generator) > 0.4).float())
        mask[0], mask[1] = 0.0, 1.0
        if case == "real":
            mask.mul_(0.5 + torch.rand(mask.shape, generator=generator))
        if case == "empty":
            mask.zero_()
    masks.heads[0].zero_()
    masks.neurons[1].zero_()
    return masks


def removed_parameters(adapter, masks: Masks) -> int:
    """Weights that pruning must remove: per head Q/K/V rows (with biases) and attn_out columns,
    per neuron an ffn_in row (with bias) and an ffn_out column."""
    d, d_h = adapter.hidden_size, adapter.head_size
    heads = sum(int((m == 0).sum()) for m in masks.heads)
    neurons = sum(int((m == 0).sum()) for m in masks.neurons)
    return heads * (4 * d * d_h + 3 * d_h) + neurons * (2 * d + 1)


def outputs(model, inputs) -> torch.Tensor:
    """The last hidden states (batch, seq, d) and task outputs (batch, labels) or (batch, seq, 2) of
    ``model``, flattened into one vector; padded positions included."""
    with torch.no_grad():
        result = model(**inputs, output_hidden_states=True)
    if "logits" in result:
        task = result.logits
    else:
        task = torch.stack([result.start_logits, result.end_logits], dim=-1)
    return torch.cat([result.hidden_states[-1].flatten(), task.flatten()])


@pytest.mark.parametrize("case", ["binary", "real", "empty"])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_copy_matches_masked_model(family, head, case, tiny_model, tiny_inputs):
    model = tiny_model(family, head)
    adapter = get_adapter(model)
    masks = make_masks(adapter, case)
    dense = outputs(model, tiny_inputs)
    with apply_masks(adapter, masks):
        masked = outputs(model, tiny_inputs)
    assert not torch.allclose(masked, dense, atol=1e-3)  # the masks do change the model

    pruned = copy.deepcopy(model)
    pruned_adapter = get_adapter(pruned)
    prune_physically(pruned_adapter, masks)

    torch.testing.assert_close(outputs(pruned, tiny_inputs), masked, atol=1e-4, rtol=0)
    assert pruned_adapter.structure() == masks.kept()
    assert pruned.config.kprune_structure == masks.kept()
    assert count_parameters(pruned) == count_parameters(model) - removed_parameters(adapter, masks)
    torch.testing.assert_close(outputs(model, tiny_inputs), dense, atol=0, rtol=0)  # the original is untouched


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_pruning_a_pruned_model_again(family, tiny_model, tiny_inputs):
    """Second pruning of survivors (emptied sub-layers get empty masks) == masking once with the product."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    first = make_masks(adapter, "real", seed=1)
    pruned = copy.deepcopy(model)
    prune_physically(get_adapter(pruned), first)

    generator = torch.Generator().manual_seed(2)
    second = Masks.ones(get_adapter(pruned))
    for mask in second.heads + second.neurons:
        mask.copy_(torch.rand(mask.shape, generator=generator) * (torch.rand(mask.shape, generator=generator) > 0.3))
    combined = first.clone()
    for total, again in zip(combined.heads + combined.neurons, second.heads + second.neurons):
        total[total != 0] *= again

    prune_physically(get_adapter(pruned), second)
    with apply_masks(adapter, combined):
        expected = outputs(model, tiny_inputs)
    torch.testing.assert_close(outputs(pruned, tiny_inputs), expected, atol=1e-4, rtol=0)
    assert get_adapter(pruned).structure() == combined.kept()


def test_mask_of_wrong_length_is_rejected(tiny_model):
    model = tiny_model("bert")
    adapter = get_adapter(model)
    masks = Masks.ones(adapter)
    masks.heads[1] = torch.ones(3)
    with pytest.raises(ValueError, match="layer 1"):
        prune_physically(adapter, masks)


def test_pruned_model_trains_through_empty_sublayers(tiny_model, tiny_inputs):
    """Fine-tuning a pruned model: gradients reach the embeddings through emptied sub-layers."""
    model = tiny_model("bert")
    adapter = get_adapter(model)
    prune_physically(adapter, make_masks(adapter, "empty"))
    model(**tiny_inputs, labels=torch.tensor([0, 1, 1])).loss.backward()
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.bert.encoder.layer[0].attention.output.dense.bias.grad is not None
