"""The model adapter: where the prunable units of a model live, asked for by role.

What a family looks like is written once, as a :class:`~kprune_cli.models.families.kprune_common.Layout`
in the family's module of :mod:`kprune_cli.models.families` (the file that ships with its pruned checkpoints).
:class:`ModelAdapter` reads it for one model and hands out :class:`LayerParts`: per layer the
projections that hold each unit's rows and columns, and the places of the forward pass where a
sub-layer's input and its residual sum can be read (:class:`Tap`), whatever the family calls them
and wherever its LayerNorms sit. Everything else (masks, measurement, slicing, tuning) is written
once against these roles.

Sub-layer numbering follows docs/design.md §3: sub-layer ``2 * l`` is the MHA
of layer ``l``, sub-layer ``2 * l + 1`` its FFN.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from kprune_cli.models.families import SUPPORTED_FAMILIES, layout_of
from kprune_cli.models.families.kprune_common import Layout, find_module, head_projections
from kprune_cli.models.flops import FlopsModel
from kprune_cli.runtime.errors import UserError


@dataclass(frozen=True)
class Tap:
    """A place of the forward pass where a tensor ``(batch, seq, d)`` can be read: the first
    positional input of ``module``, or its output (the first element of a tuple) when ``after``."""

    module: nn.Module
    after: bool = False


@dataclass
class LayerParts:
    """The modules of one transformer layer that pruning touches.

    ``attn_out`` consumes the concatenated head outputs ``(..., heads * head_size)``;
    ``ffn_out`` consumes the FFN activations ``(..., neurons)``. Masks multiply those
    inputs; physical pruning slices their columns and the matching rows of ``head_projections``
    (``qkv_blocks`` blocks of heads each) and ``ffn_in`` (``ffn_blocks`` blocks of neurons).
    ``attn_norm`` / ``ffn_norm``: each sub-layer's LayerNorm, after its residual sum (post-LN) or
    before the sub-layer (``pre_norm``).
    """

    layer: nn.Module
    head_projections: list[nn.Linear]
    attn_out: nn.Linear
    attn_norm: nn.Module
    ffn_in: nn.Linear
    ffn_out: nn.Linear
    ffn_norm: nn.Module
    head_size: int
    qkv_blocks: int
    ffn_blocks: int
    pre_norm: bool

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

    def unit_inputs(self, kind: str) -> list[tuple[nn.Linear, int]]:
        """The projections that hold the rows of the ``kind`` sub-layer's units, with their block
        counts (see :func:`~kprune_cli.models.families.kprune_common.unit_rows`)."""
        if kind == "mha":
            return [(projection, self.qkv_blocks) for projection in self.head_projections]
        return [(self.ffn_in, self.ffn_blocks)]

    def input_tap(self, kind: str) -> Tap:
        """Where the sub-layer's input ``X`` (the residual stream entering it) is read."""
        if kind == "mha":
            return Tap(self.layer)
        return Tap(self.ffn_norm if self.pre_norm else self.ffn_in)

    def sum_tap(self, kind: str) -> Tap:
        """Where the sub-layer's residual sum ``X + out_proj(A) + b`` is read: the input of the
        LayerNorm after it (post-LN); in a pre-norm layer the next sub-layer's LayerNorm input (MHA)
        or the layer's output (FFN)."""
        if not self.pre_norm:
            return Tap(self.attn_norm if kind == "mha" else self.ffn_norm)
        return Tap(self.ffn_norm) if kind == "mha" else Tap(self.layer, after=True)


class ModelAdapter:
    """The units of ``model``, per its family's :class:`~kprune_cli.models.families.kprune_common.Layout`."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.family: str = model.config.model_type
        self.layout: Layout = layout_of(model.config)

    @property
    def backbone(self) -> nn.Module:
        """The encoder model without the task head (``model.bert``, ``model.distilbert`` ...; a bare
        encoder itself)."""
        return self.model.base_model

    @property
    def embeddings(self) -> nn.Module:
        """The module whose output enters the first layer."""
        return find_module(self.backbone, self.layout.embeddings)

    def layer_modules(self) -> nn.ModuleList:
        """The list of transformer layers that the backbone loops over."""
        return find_module(self.backbone, self.layout.layers)

    def replace_layer_modules(self, layers: nn.ModuleList) -> None:
        """Make ``layers`` the list the backbone loops over."""
        owner_path, _, name = self.layout.layers.rpartition(".")
        setattr(find_module(self.backbone, owner_path) if owner_path else self.backbone, name, layers)

    def parts(self, layer: nn.Module) -> LayerParts:
        layout = self.layout
        return LayerParts(
            layer=layer,
            head_projections=head_projections(layer, layout),
            attn_out=find_module(layer, layout.attn_out),
            attn_norm=find_module(layer, layout.attn_norm),
            ffn_in=find_module(layer, layout.ffn_in),
            ffn_out=find_module(layer, layout.ffn_out),
            ffn_norm=find_module(layer, layout.ffn_norm),
            head_size=layout.head_size(self.model.config),
            qkv_blocks=layout.qkv_blocks,
            ffn_blocks=layout.ffn_blocks,
            pre_norm=layout.pre_norm,
        )

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
        return self.layout.head_size(self.model.config)

    def flops(self, seq_len: float) -> FlopsModel:
        """The FLOPs model of this family at sequence length ``seq_len``."""
        return FlopsModel(self.hidden_size, self.head_size, seq_len, neuron_inputs=self.layout.ffn_blocks)

    def structure(self) -> list[dict[str, int]]:
        """Surviving units per layer: ``[{"heads": h, "neurons": n}, ...]``."""
        return [{"heads": p.num_heads, "neurons": p.num_neurons} for p in self.layers()]


def check_supported(config: PretrainedConfig) -> None:
    """Raise a :class:`UserError` naming the supported families unless ``config``'s family is one."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise UserError(
            f"unsupported architecture {model_type!r}: supported families are "
            f"{', '.join(SUPPORTED_FAMILIES)} (MiniLM uses the bert layout)"
        )
    try:
        check = layout_of(config).unsupported
    except ImportError as error:
        raise UserError(f"the installed transformers has no {model_type} models ({error}): "
                        f"install a transformers release that has them") from error
    reason = check(config) if check is not None else None
    if reason is not None:
        raise UserError(f"unsupported {model_type} variant: {reason}")


def get_adapter(model: PreTrainedModel) -> ModelAdapter:
    """The adapter for ``model``'s family; a :class:`UserError` names the supported ones."""
    check_supported(model.config)
    return ModelAdapter(model)
