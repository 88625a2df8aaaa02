"""Pruned encoders whose layers keep different numbers of heads and FFN neurons, and the one home of
every supported family's layout.

This file is self-contained (it imports only torch and transformers): kprune copies it beside the
weights of every pruned checkpoint, so stock transformers loads the checkpoint with::

    AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)

The config keeps its stock ``model_type`` and adds ``kprune_structure`` (per layer
``{"heads": h, "neurons": n}``) and an ``auto_map`` naming one of the ``KPrune...`` classes made at
the bottom. Each class builds the stock model from the config, then shrinks every layer to the saved
structure, so the weights load with matching shapes. kprune itself prunes models with the same
:func:`prune_layer`.

A family is one :class:`Layout` in :data:`LAYOUTS`: where its layers live, which projections hold a
head's rows or a neuron's row(s), where its LayerNorms sit, and the stock task classes. Attention
modules infer the head count from the projection width (``view(..., -1, head_size)``) or read the
counters that :func:`prune_layer` updates, so slicing whole heads out of the projections is enough.
A sub-layer left with no units reduces to its residual path: ``LayerNorm(input + output bias)`` in a
post-LN family, ``input + output bias`` in a pre-norm one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    DebertaV2ForQuestionAnswering,
    DebertaV2ForSequenceClassification,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    ElectraForQuestionAnswering,
    ElectraForSequenceClassification,
    ModernBertForQuestionAnswering,
    ModernBertForSequenceClassification,
    MPNetForQuestionAnswering,
    MPNetForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    XLMRobertaForQuestionAnswering,
    XLMRobertaForSequenceClassification,
)
from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention

STRUCTURE_KEY = "kprune_structure"
HEAD_COUNTERS = ("num_attention_heads", "n_heads", "all_head_size")
"""Attributes of a stock attention module that count its heads (or their width), kept truthful."""


@dataclass(frozen=True)
class Layout:
    """Where one encoder family keeps what pruning touches. Paths are dotted attribute names:
    ``layers`` and ``embeddings`` from the backbone (``model.<base_model_prefix>``), the others from
    one layer.

    - ``attention``: the module an attention with no heads left is replaced by (its residual path);
      when ``attn_out`` lies inside it, the replacement keeps that projection (its bias survives).
    - ``head_projections``: projections whose output rows come in blocks of heads (``head_size`` rows
      each), e.g. Q, K, V; paths a model lacks (optional positional projections) are skipped.
      ``qkv_blocks``: blocks of all heads per projection (3 for a fused QKV projection).
    - ``attn_out`` / ``ffn_out``: the output projections; a unit is a set of their input columns.
    - ``ffn_in``: the FFN's input projection; ``ffn_blocks`` blocks of all neurons (2 for a gated
      FFN: value rows, then gate rows).
    - ``attn_norm`` / ``ffn_norm``: each sub-layer's LayerNorm: after its residual sum (post-LN) or
      before the sub-layer (``pre_norm``).
    - ``positions_after_padding``: position ids start at ``pad_token_id + 1`` (RoBERTa's scheme).
    - ``kept_heads_attention``: for a family whose layers share one per-head tensor (MPNet's
      relative-position bias), the subclass its pruned attention modules become; it selects the
      heads each layer kept (see :func:`record_kept_heads`).
    - ``unsupported``: the reason a config of the family cannot be pruned, or ``None`` (variants
      whose forward pass does more than loop over the layers).
    - ``task_classes``: the stock classes a pruned checkpoint may be, one ``KPrune...`` class each.
    """

    layers: str
    attention: str
    head_projections: tuple[str, ...]
    attn_out: str
    attn_norm: str
    ffn_in: str
    ffn_out: str
    ffn_norm: str
    task_classes: tuple[type[PreTrainedModel], ...]
    embeddings: str = "embeddings"
    qkv_blocks: int = 1
    ffn_blocks: int = 1
    pre_norm: bool = False
    positions_after_padding: bool = False
    kept_heads_attention: type[nn.Module] | None = None
    unsupported: Callable[[PretrainedConfig], str | None] | None = None

    @staticmethod
    def head_size(config: PretrainedConfig) -> int:
        """Width of one head."""
        return getattr(config, "attention_head_size", None) or config.hidden_size // config.num_attention_heads

    @property
    def attention_owns_output(self) -> bool:
        """Whether ``attn_out`` is a child of ``attention`` (DistilBERT's ``out_lin``, ...)."""
        return self.attn_out.startswith(self.attention + ".")


class MPNetSelfAttentionKeptHeads(MPNetSelfAttention):
    """MPNet's self-attention after head pruning. The encoder computes the relative-position bias
    once for all the stock heads, ``(batch, heads, q, k)``; this layer adds only the rows of the
    heads it kept, ``kept_heads`` ``(k,)`` (a buffer, saved with the weights)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, ...]:
        if position_bias is not None:
            position_bias = position_bias[:, self.kept_heads]  # (batch, k, q, k_len)
        return super().forward(hidden_states, attention_mask, position_bias, **kwargs)


def _deberta_v2_unsupported(config: PretrainedConfig) -> str | None:
    """DeBERTa-v2's optional convolution after the first layer (v2 xlarge/xxlarge) mixes the
    encoder's input into layer 0's output outside the layers, which passes that start at a later
    layer cannot reproduce."""
    if getattr(config, "conv_kernel_size", 0) > 0:
        return "its convolution after the first layer (conv_kernel_size > 0) is not supported"
    return None


def _bert_layout(*task_classes: type[PreTrainedModel], **changes) -> Layout:
    """BERT's layout (``encoder.layer[i].attention.self.query`` ...), shared by several families."""
    fields = dict(
        layers="encoder.layer", attention="attention.self",
        head_projections=("attention.self.query", "attention.self.key", "attention.self.value"),
        attn_out="attention.output.dense", attn_norm="attention.output.LayerNorm",
        ffn_in="intermediate.dense", ffn_out="output.dense", ffn_norm="output.LayerNorm",
    )
    return Layout(**{**fields, **changes}, task_classes=task_classes)


LAYOUTS: dict[str, Layout] = {
    "bert": _bert_layout(BertForSequenceClassification, BertForQuestionAnswering),
    "roberta": _bert_layout(RobertaForSequenceClassification, RobertaForQuestionAnswering,
                            positions_after_padding=True),
    "electra": _bert_layout(ElectraForSequenceClassification, ElectraForQuestionAnswering),
    "xlm-roberta": _bert_layout(XLMRobertaForSequenceClassification, XLMRobertaForQuestionAnswering,
                                positions_after_padding=True),
    "mpnet": Layout(
        layers="encoder.layer", attention="attention.attn",
        head_projections=("attention.attn.q", "attention.attn.k", "attention.attn.v"),
        attn_out="attention.attn.o", attn_norm="attention.LayerNorm",
        ffn_in="intermediate.dense", ffn_out="output.dense", ffn_norm="output.LayerNorm",
        task_classes=(MPNetForSequenceClassification, MPNetForQuestionAnswering),
        positions_after_padding=True, kept_heads_attention=MPNetSelfAttentionKeptHeads,
    ),
    "deberta-v2": _bert_layout(
        DebertaV2ForSequenceClassification, DebertaV2ForQuestionAnswering,
        head_projections=("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                          "attention.self.pos_query_proj", "attention.self.pos_key_proj"),
        unsupported=_deberta_v2_unsupported,
    ),
    "modernbert": Layout(
        layers="layers", attention="attn", head_projections=("attn.Wqkv",), qkv_blocks=3,
        attn_out="attn.Wo", attn_norm="attn_norm", ffn_in="mlp.Wi", ffn_blocks=2, ffn_out="mlp.Wo",
        ffn_norm="mlp_norm", pre_norm=True,
        task_classes=(ModernBertForSequenceClassification, ModernBertForQuestionAnswering),
    ),
    "distilbert": Layout(
        layers="transformer.layer", attention="attention",
        head_projections=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
        attn_out="attention.out_lin", attn_norm="sa_layer_norm",
        ffn_in="ffn.lin1", ffn_out="ffn.lin2", ffn_norm="output_layer_norm",
        task_classes=(DistilBertForSequenceClassification, DistilBertForQuestionAnswering),
    ),
}
"""Every supported family by ``model_type``. MiniLM checkpoints are ``bert``; XLM-RoBERTa keeps
RoBERTa's layout; DeBERTa-v3 checkpoints are ``deberta-v2``, whose relative-position projections
(``pos_query_proj`` / ``pos_key_proj``, present unless ``share_att_key``) are split by heads like
Q and K; with ``share_att_key`` the positions go through Q and K themselves. ModernBERT is pre-norm
(``attn_norm`` is an identity in layer 0), with a fused ``Wqkv`` (Q, K, V blocks of all heads), a
gated ``Wi`` (value rows, then gate rows) and, by default, no biases; its rotary positions and
alternating local/global attention need nothing from pruning."""


def layout_of(config: PretrainedConfig) -> Layout:
    """The layout of ``config``'s family (``KeyError`` for an unsupported one)."""
    return LAYOUTS[config.model_type]


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule of ``root`` at dotted ``path``, or ``None`` if it has none there."""
    module = root
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


class EmptyAttentionHeads(nn.Module):
    """Stands in for a self-attention that has no heads left and whose output projection lives
    outside it (BERT layout).

    Returns a ``(batch, seq, 0)`` tensor, so the output projection (now ``Linear(0, d)``) adds only
    its bias and the sub-layer reduces to its residual path.
    """

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


class EmptyAttention(nn.Module):
    """Stands in for an attention with no heads left that owns its output projection (DistilBERT).

    Keeps the projection (``Linear(0, d)``) under its stock attribute name, so that its bias, the only
    thing left, is saved and loaded under its usual key.
    """

    def __init__(self, name: str, projection: nn.Linear) -> None:
        super().__init__()
        self.projection_name = name
        self.add_module(name, projection)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        empty = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)  # (batch, seq, 0)
        return getattr(self, self.projection_name)(empty), None


def empty_attention(layer: nn.Module, layout: Layout) -> None:
    """Replace the attention of ``layer`` (left with no heads) by its residual path."""
    parent_path, _, name = layout.attention.rpartition(".")
    parent = find_module(layer, parent_path) if parent_path else layer
    if layout.attention_owns_output:
        projection_name = layout.attn_out[len(layout.attention) + 1:]
        setattr(parent, name, EmptyAttention(projection_name, find_module(layer, layout.attn_out)))
    else:
        setattr(parent, name, EmptyAttentionHeads())


def unit_rows(index: torch.Tensor, width: int, blocks: int = 1) -> torch.Tensor:
    """Rows of a projection whose output holds ``blocks`` blocks of ``width`` unit features each
    (Q|K|V of a fused projection, value|gate of a gated FFN) that belong to the features ``index``
    ``(k,)`` of one block: ``(blocks * k,)``, block by block."""
    offsets = torch.arange(blocks, device=index.device)[:, None] * width  # (blocks, 1)
    return (offsets + index[None, :]).flatten()


def keep_units(inputs: list[tuple[nn.Linear, int]], output: nn.Linear, index: torch.Tensor,
               scale: torch.Tensor | None = None) -> None:
    """Keep only the units at ``index`` (k,) of a sub-layer, in place.

    A unit is an output feature of every ``inputs`` projection (a weight row and a bias entry per
    block, see :func:`unit_rows`; ``inputs`` pairs each projection with its block count) and an input
    feature of ``output`` (a weight column). ``scale`` (k,) multiplies the kept columns of ``output``:
    a real-valued mask folded into the weights. ``output`` keeps its bias.
    """
    width = output.in_features
    with torch.no_grad():
        for linear, blocks in inputs:
            rows = unit_rows(index.to(linear.weight.device), width, blocks)
            linear.weight = nn.Parameter(linear.weight[rows], linear.weight.requires_grad)  # (blocks*k, d_in)
            if linear.bias is not None:
                linear.bias = nn.Parameter(linear.bias[rows], linear.bias.requires_grad)  # (blocks*k,)
            linear.out_features = len(rows)
        columns = output.weight[:, index.to(output.weight.device)]  # (d_out, k)
        if scale is not None:
            columns = columns * scale.to(columns)
        output.weight = nn.Parameter(columns, output.weight.requires_grad)
        output.in_features = len(index)


def record_kept_heads(attention: nn.Module, heads: torch.Tensor, subclass: type[nn.Module]) -> None:
    """Make ``attention`` a ``subclass`` that remembers which of the stock heads it keeps:
    ``heads`` ``(k,)`` index its current heads (already a selection after an earlier pruning)."""
    if isinstance(attention, subclass):
        heads = attention.kept_heads[heads.to(attention.kept_heads.device)]
    else:
        attention.__class__ = subclass
    attention.register_buffer("kept_heads", heads.clone())


def head_projections(layer: nn.Module, layout: Layout) -> list[nn.Linear]:
    """The projections of ``layer`` whose output rows come per head (none once its attention is emptied)."""
    return [module for path in layout.head_projections if (module := find_module(layer, path)) is not None]


def prune_layer(layer: nn.Module, config: PretrainedConfig, heads: torch.Tensor, neurons: torch.Tensor,
                head_scale: torch.Tensor | None = None, neuron_scale: torch.Tensor | None = None) -> None:
    """Keep the heads ``heads`` (k,) and FFN neurons ``neurons`` (m,) of ``layer`` (indices), in place.

    ``head_scale`` (k,) and ``neuron_scale`` (m,) multiply the kept units' outputs. A sub-layer left
    with no units becomes its residual path (its output projection keeps its bias).
    """
    layout = layout_of(config)
    head_size = layout.head_size(config)
    offsets = torch.arange(head_size, device=heads.device)
    columns = (heads[:, None] * head_size + offsets).flatten()  # (k * head_size,)
    column_scale = head_scale.repeat_interleave(head_size) if head_scale is not None else None
    qkv = [(projection, layout.qkv_blocks) for projection in head_projections(layer, layout)]
    keep_units(qkv, find_module(layer, layout.attn_out), columns, column_scale)
    if len(heads) == 0:
        empty_attention(layer, layout)
    else:
        attention = find_module(layer, layout.attention)
        for attribute, value in zip(HEAD_COUNTERS, (len(heads), len(heads), len(columns))):
            if hasattr(attention, attribute):  # keep the stock head counts truthful
                setattr(attention, attribute, value)
        if layout.kept_heads_attention is not None:
            record_kept_heads(attention, heads, layout.kept_heads_attention)
    ffn_in = find_module(layer, layout.ffn_in)
    keep_units([(ffn_in, layout.ffn_blocks)], find_module(layer, layout.ffn_out), neurons, neuron_scale)


def encoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The transformer layers of ``model``, bottom-up."""
    return find_module(getattr(model, model.base_model_prefix), layout_of(model.config).layers)


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


PRUNED_CLASSES: dict[type[PreTrainedModel], type[PreTrainedModel]] = {
    stock: _pruned_class(stock) for layout in LAYOUTS.values() for stock in layout.task_classes
}
"""The pruned class of every stock task class; each is also a module attribute (``KPruneBertFor...``),
which is what a checkpoint's ``auto_map`` names."""
globals().update({pruned.__name__: pruned for pruned in PRUNED_CLASSES.values()})


def auto_map_for(model: PreTrainedModel) -> dict[str, str]:
    """The config ``auto_map`` entry that loads ``model``'s pruned class from this file."""
    stock = next((cls for cls in type(model).__mro__ if cls in PRUNED_CLASSES), None)
    if stock is None:
        raise ValueError(f"no pruned class for {type(model).__name__}: supported are "
                         f"{', '.join(cls.__name__ for cls in PRUNED_CLASSES)}")
    head = stock.__name__[stock.__name__.index("For"):]  # "ForSequenceClassification"
    return {f"AutoModel{head}": f"{__name__.rsplit('.', 1)[-1]}.{PRUNED_CLASSES[stock].__name__}"}
