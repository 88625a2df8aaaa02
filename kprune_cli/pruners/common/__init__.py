"""Building blocks shared by the pruning methods: scoped hooks (``hooks.py``), the ridge
least-squares solve (``lstsq.py``), a sub-layer's reconstruction system (``reconstruction.py``),
teacher signals (``teacher.py``), forward passes over a window of layers (``window.py``), the
budgeted mask search KPMS (``kpms.py``); here: the sub-layer numbering of docs/design.md §3, keep-masks from
search results, and stage timing.

Sub-layer ``s`` is the MHA of layer ``s // 2`` when ``s`` is even and its FFN when ``s`` is odd.
"""

from __future__ import annotations

from typing import Mapping

import torch

from kprune_cli.models.adapters import LayerParts, ModelAdapter
from kprune_cli.models.masks import Masks


def sublayer_kind(sublayer: int) -> str:
    """``"mha"`` for even sub-layers, ``"ffn"`` for odd ones."""
    return "mha" if sublayer % 2 == 0 else "ffn"


def sublayer_parts(adapter: ModelAdapter, sublayer: int) -> tuple[LayerParts, str]:
    """The parts of the layer holding ``sublayer`` and the sub-layer's kind."""
    return adapter.layers()[sublayer // 2], sublayer_kind(sublayer)


def unit_width(parts: LayerParts, kind: str) -> int:
    """Columns of the output projection per unit: ``head_size`` for a head, 1 for a neuron."""
    return parts.head_size if kind == "mha" else 1


def keep_masks(adapter: ModelAdapter, keep: Mapping[int, torch.Tensor], device: torch.device | str = "cpu") -> Masks:
    """0/1 masks from per-sub-layer keep-masks ``keep[s]`` ``(units,)`` bool; sub-layers absent
    from ``keep`` stay all ones."""
    masks = Masks.ones(adapter, device)
    for s, kept in keep.items():
        masks.of(sublayer_kind(s))[s // 2] = kept.to(device=device, dtype=masks.heads[0].dtype)
    return masks


