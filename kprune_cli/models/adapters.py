"""Architecture adapters: where the prunable units of each encoder family live.

One adapter per family says, for every layer, which modules hold the attention's
Q/K/V/output projections, the FFN's input/output projections and the LayerNorms
after each residual. Everything else (masks, measurement, slicing, tuning) is written
once against :class:`LayerParts`.

Sub-layer numbering follows DESIGN.md §3: sub-layer ``2 * l`` is the MHA of layer ``l``,
sub-layer ``2 * l + 1`` its FFN.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from kprune_cli.errors import UserError
from kprune_cli.models.modeling_kprune import (  # noqa: F401  (re-exported: the empty sub-layer modules)
    EmptyAttentionHeads,
    EmptyDistilBertAttention,
    empty_attention,
)

SUPPORTED_FAMILIES = ("bert", "roberta", "electra", "distilbert")


@dataclass
class LayerParts:
    """The modules of one transformer layer that pruning touches.

    ``attn_out`` consumes the concatenated head outputs ``(..., heads * head_size)``;
    ``ffn_out`` consumes the FFN activations ``(..., neurons)``. Masks multiply those
    inputs; physical pruning slices their columns (and the matching Q/K/V or ``ffn_in`` rows).
    ``attn_norm`` / ``ffn_norm`` are the LayerNorms whose input is the pre-LN residual sum
    (sub-layer input + sub-layer output).
    """

    layer: nn.Module
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear
    attn_norm: nn.LayerNorm
    ffn_in: nn.Linear
    ffn_out: nn.Linear
    ffn_norm: nn.LayerNorm
    head_size: int

    @property
    def num_heads(self) -> int:
        """Current number of heads (after any physical pruning)."""
        return self.attn_out.in_features // self.head_size

    @property
    def num_neurons(self) -> int:
        """Current number of FFN neurons (after any physical pruning)."""
        return self.ffn_out.in_features

    def out_proj(self, kind: str) -> nn.Linear:
        """Output projection of the ``"mha"`` or ``"ffn"`` sub-layer."""
        return self.attn_out if kind == "mha" else self.ffn_out

    def norm(self, kind: str) -> nn.LayerNorm:
        """LayerNorm after the ``"mha"`` or ``"ffn"`` residual sum."""
        return self.attn_norm if kind == "mha" else self.ffn_norm


class ModelAdapter:
    """Base adapter: subclasses name the modules of their family."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.family: str = model.config.model_type

    @property
    def backbone(self) -> nn.Module:
        """The encoder model without the task head (``model.bert``, ``model.distilbert`` ...)."""
        return getattr(self.model, self.model.base_model_prefix)

    def layer_modules(self) -> nn.ModuleList:
        raise NotImplementedError

    def parts(self, layer: nn.Module) -> LayerParts:
        raise NotImplementedError

    def empty_attention(self, layer: nn.Module) -> None:
        """Replace the attention of ``layer`` (left with no heads) by its residual path."""
        empty_attention(layer, self.model.config)

    def layers(self) -> list[LayerParts]:
        """The parts of every layer, bottom-up."""
        return [self.parts(layer) for layer in self.layer_modules()]

    @property
    def num_layers(self) -> int:
        return len(self.layer_modules())

    @property
    def hidden_size(self) -> int:
        return self.layers()[0].attn_out.out_features

    @property
    def head_size(self) -> int:
        return self.layers()[0].head_size

    def structure(self) -> list[dict[str, int]]:
        """Surviving units per layer: ``[{"heads": h, "neurons": n}, ...]``."""
        return [{"heads": p.num_heads, "neurons": p.num_neurons} for p in self.layers()]


class BertLayoutAdapter(ModelAdapter):
    """BERT, RoBERTa, ELECTRA and MiniLM: ``encoder.layer[i].attention.self.query`` ..."""

    def layer_modules(self) -> nn.ModuleList:
        return self.backbone.encoder.layer

    def parts(self, layer: nn.Module) -> LayerParts:
        config = self.model.config
        attention = layer.attention
        self_attn = attention.self
        # An emptied attention keeps its projections' empty shells on the output side only.
        query = getattr(self_attn, "query", None) or _empty_linear(config.hidden_size)
        key = getattr(self_attn, "key", None) or _empty_linear(config.hidden_size)
        value = getattr(self_attn, "value", None) or _empty_linear(config.hidden_size)
        return LayerParts(
            layer=layer,
            query=query,
            key=key,
            value=value,
            attn_out=attention.output.dense,
            attn_norm=attention.output.LayerNorm,
            ffn_in=layer.intermediate.dense,
            ffn_out=layer.output.dense,
            ffn_norm=layer.output.LayerNorm,
            head_size=config.hidden_size // config.num_attention_heads,
        )


class DistilBertAdapter(ModelAdapter):
    """DistilBERT: ``transformer.layer[i].attention.q_lin``, ``ffn.lin1`` ..."""

    def layer_modules(self) -> nn.ModuleList:
        return self.backbone.transformer.layer

    def parts(self, layer: nn.Module) -> LayerParts:
        config = self.model.config
        attention = layer.attention
        return LayerParts(
            layer=layer,
            query=getattr(attention, "q_lin", None) or _empty_linear(config.dim),
            key=getattr(attention, "k_lin", None) or _empty_linear(config.dim),
            value=getattr(attention, "v_lin", None) or _empty_linear(config.dim),
            attn_out=attention.out_lin,
            attn_norm=layer.sa_layer_norm,
            ffn_in=layer.ffn.lin1,
            ffn_out=layer.ffn.lin2,
            ffn_norm=layer.output_layer_norm,
            head_size=config.dim // config.n_heads,
        )


def _empty_linear(in_features: int) -> nn.Linear:
    """A ``Linear(in_features, 0)`` placeholder for the Q/K/V of an emptied attention."""
    with warnings.catch_warnings():  # torch warns that initialising its empty weight is a no-op
        warnings.simplefilter("ignore", UserWarning)
        return nn.Linear(in_features, 0)


_ADAPTERS: dict[str, type[ModelAdapter]] = {
    "bert": BertLayoutAdapter,
    "roberta": BertLayoutAdapter,
    "electra": BertLayoutAdapter,
    "distilbert": DistilBertAdapter,
}


def check_supported(config: PretrainedConfig) -> None:
    """Raise a :class:`UserError` naming the supported families unless ``config``'s family is one."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise UserError(
            f"unsupported architecture {model_type!r}: supported families are "
            f"{', '.join(SUPPORTED_FAMILIES)} (MiniLM uses the bert layout)"
        )


def get_adapter(model: PreTrainedModel) -> ModelAdapter:
    """The adapter for ``model``'s family; a :class:`UserError` names the supported ones."""
    check_supported(model.config)
    return _ADAPTERS[model.config.model_type](model)
