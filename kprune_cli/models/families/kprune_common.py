"""What every pruned encoder family shares: the :class:`Layout` that says where a family keeps what
pruning touches, the layer surgery (:func:`prune_layer`), the modules an emptied sub-layer becomes,
and :class:`PrunedLayers`, the hook that rebuilds a pruned checkpoint's layers at load time.

This file ships, as ``kprune_common.py``, beside the weights of every pruned checkpoint, with the
family's own module as ``modeling_kprune.py`` (which imports it as ``.kprune_common``). Both import
only torch and transformers, and this one names no family, so stock transformers loads a checkpoint
with::

    AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)

on any installation that has the checkpoint's family, whatever other families it has.

The config keeps its stock ``model_type`` and adds ``kprune_structure`` (per layer
``{"heads": h, "neurons": n}``) and an ``auto_map`` naming the family module's classes. Each class
builds the stock model from the config, then shrinks every layer to the saved structure, so the
weights load with matching shapes. kprune itself prunes models with the same :func:`prune_layer`.

Attention modules infer the head count from the projection width (``view(..., -1, head_size)``) or
read the counters that :func:`prune_layer` updates, so slicing whole heads out of the projections is
enough. A sub-layer left with no units reduces to its residual path: ``LayerNorm(input + output
bias)`` in a post-LN family, ``input + output bias`` in a pre-norm one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

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
    - ``positions_after_padding``: position ids start at ``pad_token_id + 1``.
    - ``kept_heads_attention``: for a family whose layers share one per-head tensor (a relative-position
      bias computed once for all layers), the subclass its pruned attention modules become; it selects
      the heads each layer kept (see :func:`record_kept_heads`).
    - ``unsupported``: the reason a config of the family cannot be pruned, or ``None`` (variants
      whose forward pass does more than loop over the layers).
    - ``encoder_class``: the stock encoder without a head (``AutoModel``); ``task_classes``: the stock
      classes with a task head that a pruned checkpoint may be. The family's module defines a pruned
      class of the same name for each (a :class:`PrunedLayers` subclass of the stock one).
    """

    layers: str
    attention: str
    head_projections: tuple[str, ...]
    attn_out: str
    attn_norm: str
    ffn_in: str
    ffn_out: str
    ffn_norm: str
    encoder_class: type[PreTrainedModel]
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
        """Whether ``attn_out`` is a child of ``attention`` (an attention module with its own output
        projection)."""
        return self.attn_out.startswith(self.attention + ".")


def encoder_layer_layout(encoder_class: type[PreTrainedModel], *task_classes: type[PreTrainedModel],
                         **changes) -> Layout:
    """The layout several families share: layers at ``encoder.layer``, Q/K/V at
    ``attention.self.query`` ..., a LayerNorm after each residual sum; ``changes`` override fields."""
    fields = dict(
        layers="encoder.layer", attention="attention.self",
        head_projections=("attention.self.query", "attention.self.key", "attention.self.value"),
        attn_out="attention.output.dense", attn_norm="attention.output.LayerNorm",
        ffn_in="intermediate.dense", ffn_out="output.dense", ffn_norm="output.LayerNorm",
    )
    return Layout(**{**fields, **changes}, encoder_class=encoder_class, task_classes=task_classes)


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
    outside it.

    Returns a ``(batch, seq, 0)`` tensor, so the output projection (now ``Linear(0, d)``) adds only
    its bias and the sub-layer reduces to its residual path.
    """

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


class EmptyAttention(nn.Module):
    """Stands in for an attention with no heads left that owns its output projection.

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
    ``heads`` ``(k,)`` index its current heads (already a selection after an earlier pruning).

    An attention that already keeps a selection (its ``kept_heads`` buffer) may be of another copy
    of ``subclass``: the one a checkpoint loaded from its own ``modeling_kprune.py``.
    """
    kept = getattr(attention, "kept_heads", None)
    if kept is not None:
        heads = kept[heads.to(kept.device)]
    attention.__class__ = subclass
    attention.register_buffer("kept_heads", heads.clone())


def head_projections(layer: nn.Module, layout: Layout) -> list[nn.Linear]:
    """The projections of ``layer`` whose output rows come per head (none once its attention is emptied)."""
    return [module for path in layout.head_projections if (module := find_module(layer, path)) is not None]


def prune_layer(layer: nn.Module, layout: Layout, config: PretrainedConfig, heads: torch.Tensor,
                neurons: torch.Tensor, head_scale: torch.Tensor | None = None,
                neuron_scale: torch.Tensor | None = None) -> None:
    """Keep the heads ``heads`` (k,) and FFN neurons ``neurons`` (m,) of ``layer``, a layer of
    ``layout``'s family (indices), in place.

    ``head_scale`` (k,) and ``neuron_scale`` (m,) multiply the kept units' outputs. A sub-layer left
    with no units becomes its residual path (its output projection keeps its bias).
    """
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


def encoder_layers(model: PreTrainedModel, layout: Layout) -> nn.ModuleList:
    """The transformer layers of ``model`` (with or without a task head), bottom-up."""
    return find_module(model.base_model, layout.layers)


def resize_to_structure(model: PreTrainedModel, layout: Layout, structure: list[dict[str, int]]) -> None:
    """Shrink a freshly built ``model`` so that layer ``l`` keeps its first ``structure[l]`` units."""
    layers = encoder_layers(model, layout)
    if len(structure) != len(layers):
        raise ValueError(f"{STRUCTURE_KEY} has {len(structure)} layers, the model {len(layers)}")
    for layer, kept in zip(layers, structure):
        prune_layer(layer, layout, model.config, torch.arange(kept["heads"]), torch.arange(kept["neurons"]))


class PrunedLayers:
    """Mixin, first base of a pruned class beside the stock class it prunes: the stock model is built
    from the config, then every layer is shrunk to ``config.kprune_structure``, so a pruned
    checkpoint's weights load with matching shapes.

    A family's module sets ``kprune_layout`` and names each pruned class like its stock class, so
    that transformers' pipelines, which check the model class by name, accept it.
    """

    kprune_layout: Layout

    def __init__(self, config: PretrainedConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        resize_to_structure(self, self.kprune_layout, getattr(config, STRUCTURE_KEY))


def pruned_classes(layout: Layout, module: str) -> tuple[type[PreTrainedModel], ...]:
    """The pruned class of ``layout.encoder_class`` and of each of ``layout.task_classes``, in that
    order: a :class:`PrunedLayers` subclass of the stock class, with its name, defined in ``module``
    (the family's module, whose file a checkpoint ships and whose ``auto_map`` names the classes)."""
    return tuple(
        type(stock.__name__, (PrunedLayers, stock), {
            "kprune_layout": layout, "__module__": module,
            "__doc__": f"{stock.__name__} whose layers keep the heads and neurons of ``config.{STRUCTURE_KEY}``.",
        })
        for stock in (layout.encoder_class, *layout.task_classes)
    )
