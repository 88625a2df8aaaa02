"""Building blocks shared by the pruning methods: scoped hooks, the ridge least-squares solve,
teacher signals, and the sub-layer numbering of DESIGN.md §3.

Sub-layer ``s`` is the MHA of layer ``s // 2`` when ``s`` is even and its FFN when ``s`` is odd.
"""

from __future__ import annotations

from kprune_cli.models.adapters import LayerParts, ModelAdapter


def sublayer_kind(sublayer: int) -> str:
    """``"mha"`` for even sub-layers, ``"ffn"`` for odd ones."""
    return "mha" if sublayer % 2 == 0 else "ffn"


def sublayer_parts(adapter: ModelAdapter, sublayer: int) -> tuple[LayerParts, str]:
    """The parts of the layer holding ``sublayer`` and the sub-layer's kind."""
    return adapter.layers()[sublayer // 2], sublayer_kind(sublayer)


def unit_width(parts: LayerParts, kind: str) -> int:
    """Columns of the output projection per unit: ``head_size`` for a head, 1 for a neuron."""
    return parts.head_size if kind == "mha" else 1
