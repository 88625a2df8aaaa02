"""Pruned BERT-family encoders whose layers keep different numbers of heads and FFN neurons.

This file is self-contained (it imports only torch and transformers): kprune copies it beside the
weights of every pruned checkpoint, so stock transformers loads the checkpoint with::

    AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)

The config keeps its stock ``model_type`` and adds ``kprune_structure`` (per layer
``{"heads": h, "neurons": n}``) and an ``auto_map`` naming one of the classes at the bottom. Each
class builds the stock model from the config, then shrinks every layer to the saved structure, so the
weights load with matching shapes. kprune itself prunes models with the same :func:`prune_layer`.

Layouts: BERT, RoBERTa, ELECTRA (and MiniLM) keep ``layer.attention.self.{query,key,value}``,
``layer.attention.output.dense``, ``layer.intermediate.dense`` and ``layer.output.dense``; DistilBERT
keeps ``layer.attention.{q_lin,k_lin,v_lin,out_lin}`` and ``layer.ffn.{lin1,lin2}``. Attention modules
infer the head count from the projection width (``view(..., -1, head_size)``), so slicing whole heads
out of Q/K/V is enough. A sub-layer left with no units reduces to its residual path:
``LayerNorm(input + output bias)``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    ElectraForQuestionAnswering,
    ElectraForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
)

STRUCTURE_KEY = "kprune_structure"


class EmptyAttentionHeads(nn.Module):
    """Stands in for a BERT-layout self-attention that has no heads left.

    Returns a ``(batch, seq, 0)`` tensor, so the output projection (now ``Linear(0, d)``) adds only
    its bias and the sub-layer reduces to ``LayerNorm(input + bias)``.
    """

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


class EmptyDistilBertAttention(nn.Module):
    """Stands in for a DistilBERT attention (which owns its output projection) with no heads.

    Keeps the projection (``Linear(0, d)``) so that its bias, the only thing left, is saved and
    loaded under its usual name.
    """

    def __init__(self, out_lin: nn.Linear) -> None:
        super().__init__()
        self.out_lin = out_lin

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        empty = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)  # (batch, seq, 0)
        return self.out_lin(empty), None


def _is_distilbert(config: PretrainedConfig) -> bool:
    return config.model_type == "distilbert"


def empty_attention(layer: nn.Module, config: PretrainedConfig) -> None:
    """Replace the attention of ``layer`` (left with no heads) by its residual path."""
    if _is_distilbert(config):
        layer.attention = EmptyDistilBertAttention(layer.attention.out_lin)
    else:
        layer.attention.self = EmptyAttentionHeads()


def keep_units(inputs: list[nn.Linear], output: nn.Linear, index: torch.Tensor,
               scale: torch.Tensor | None = None) -> None:
    """Keep only the units at ``index`` (k,) of a sub-layer, in place.

    A unit is an output feature of every ``inputs`` projection (a weight row and a bias entry) and an
    input feature of ``output`` (a weight column). ``scale`` (k,) multiplies the kept columns of
    ``output``: a real-valued mask folded into the weights. ``output`` keeps its bias.
    """
    with torch.no_grad():
        for linear in inputs:
            rows = index.to(linear.weight.device)
            linear.weight = nn.Parameter(linear.weight[rows], linear.weight.requires_grad)  # (k, d_in)
            if linear.bias is not None:
                linear.bias = nn.Parameter(linear.bias[rows], linear.bias.requires_grad)  # (k,)
            linear.out_features = len(index)
        columns = output.weight[:, index.to(output.weight.device)]  # (d_out, k)
        if scale is not None:
            columns = columns * scale.to(columns)
        output.weight = nn.Parameter(columns, output.weight.requires_grad)
        output.in_features = len(index)


def prune_layer(layer: nn.Module, config: PretrainedConfig, heads: torch.Tensor, neurons: torch.Tensor,
                head_scale: torch.Tensor | None = None, neuron_scale: torch.Tensor | None = None) -> None:
    """Keep the heads ``heads`` (k,) and FFN neurons ``neurons`` (m,) of ``layer`` (indices), in place.

    ``head_scale`` (k,) and ``neuron_scale`` (m,) multiply the kept units' outputs. A sub-layer left
    with no units becomes its residual path (its output projection keeps its bias).
    """
    head_size = config.hidden_size // config.num_attention_heads
    offsets = torch.arange(head_size, device=heads.device)
    columns = (heads[:, None] * head_size + offsets).flatten()  # (k * head_size,)
    column_scale = head_scale.repeat_interleave(head_size) if head_scale is not None else None
    if _is_distilbert(config):
        attention, names, attn_out = layer.attention, ("q_lin", "k_lin", "v_lin"), layer.attention.out_lin
        ffn_in, ffn_out = layer.ffn.lin1, layer.ffn.lin2
    else:
        attention, names, attn_out = layer.attention.self, ("query", "key", "value"), layer.attention.output.dense
        ffn_in, ffn_out = layer.intermediate.dense, layer.output.dense
    qkv = [getattr(attention, name) for name in names if hasattr(attention, name)]  # none once emptied
    keep_units(qkv, attn_out, columns, column_scale)
    if len(heads) == 0:
        empty_attention(layer, config)
    else:
        for attribute, value in (("num_attention_heads", len(heads)), ("n_heads", len(heads)),
                                 ("all_head_size", len(columns))):
            if hasattr(attention, attribute):  # keep the stock head counts truthful
                setattr(attention, attribute, value)
    keep_units([ffn_in], ffn_out, neurons, neuron_scale)


def encoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The transformer layers of ``model``, bottom-up."""
    backbone = getattr(model, model.base_model_prefix)
    return backbone.transformer.layer if _is_distilbert(model.config) else backbone.encoder.layer


def resize_to_structure(model: PreTrainedModel, structure: list[dict[str, int]]) -> None:
    """Shrink a freshly built ``model`` so that layer ``l`` keeps its first ``structure[l]`` units."""
    layers = encoder_layers(model)
    if len(structure) != len(layers):
        raise ValueError(f"{STRUCTURE_KEY} has {len(structure)} layers, the model {len(layers)}")
    for layer, kept in zip(layers, structure):
        prune_layer(layer, model.config, torch.arange(kept["heads"]), torch.arange(kept["neurons"]))


def _pruned_class(base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """``base`` whose layers are shrunk to ``config.kprune_structure`` right after construction."""

    def __init__(self, config: PretrainedConfig, *args, **kwargs) -> None:
        base.__init__(self, config, *args, **kwargs)
        resize_to_structure(self, getattr(config, STRUCTURE_KEY))

    return type(f"KPrune{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__,
                                                    "__doc__": f"{base.__name__} with pruned layers."})


KPruneBertForSequenceClassification = _pruned_class(BertForSequenceClassification)
KPruneBertForQuestionAnswering = _pruned_class(BertForQuestionAnswering)
KPruneRobertaForSequenceClassification = _pruned_class(RobertaForSequenceClassification)
KPruneRobertaForQuestionAnswering = _pruned_class(RobertaForQuestionAnswering)
KPruneElectraForSequenceClassification = _pruned_class(ElectraForSequenceClassification)
KPruneElectraForQuestionAnswering = _pruned_class(ElectraForQuestionAnswering)
KPruneDistilBertForSequenceClassification = _pruned_class(DistilBertForSequenceClassification)
KPruneDistilBertForQuestionAnswering = _pruned_class(DistilBertForQuestionAnswering)

PRUNED_CLASSES: dict[type[PreTrainedModel], type[PreTrainedModel]] = {
    cls.__base__: cls for cls in (
        KPruneBertForSequenceClassification, KPruneBertForQuestionAnswering,
        KPruneRobertaForSequenceClassification, KPruneRobertaForQuestionAnswering,
        KPruneElectraForSequenceClassification, KPruneElectraForQuestionAnswering,
        KPruneDistilBertForSequenceClassification, KPruneDistilBertForQuestionAnswering,
    )
}


def auto_map_for(model: PreTrainedModel) -> dict[str, str]:
    """The config ``auto_map`` entry that loads ``model``'s pruned class from this file."""
    stock = next((cls for cls in type(model).__mro__ if cls in PRUNED_CLASSES), None)
    if stock is None:
        raise ValueError(f"no pruned class for {type(model).__name__}: supported are "
                         f"{', '.join(cls.__name__ for cls in PRUNED_CLASSES)}")
    head = stock.__name__[stock.__name__.index("For"):]  # "ForSequenceClassification"
    return {f"AutoModel{head}": f"{__name__.rsplit('.', 1)[-1]}.{PRUNED_CLASSES[stock].__name__}"}
