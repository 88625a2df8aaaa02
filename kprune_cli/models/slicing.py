"""Physical pruning: remove masked-out heads and neurons from a model's weight matrices.

The layer surgery itself lives in :mod:`kprune_cli.models.families.kprune_common` (it ships with every
pruned checkpoint, which rebuilds its layers with the same code); this module turns keep-masks into
kept indices and scales and records the resulting structure in the model config.
"""

from __future__ import annotations

import torch

from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.families.kprune_common import STRUCTURE_KEY, prune_layer
from kprune_cli.models.masks import Masks


def prune_physically(adapter: ModelAdapter, masks: Masks) -> None:
    """Remove every unit whose mask is 0 from ``adapter.model``, in place.

    Per layer: rows of Q/K/V by whole heads and the matching columns of the attention output, rows of
    the FFN input and columns of the FFN output. Non-binary mask values are folded into the kept
    columns of the output projections, so the pruned model computes what the masked one did. A
    sub-layer left with no units becomes its residual path. The new per-layer structure is stored as
    ``config.kprune_structure`` (``[{"heads": h, "neurons": n}, ...]``) so that it can be saved.
    """
    config = adapter.model.config
    for index, (parts, head_mask, neuron_mask) in enumerate(zip(adapter.layers(), masks.heads, masks.neurons)):
        if head_mask.shape != (parts.num_heads,) or neuron_mask.shape != (parts.num_neurons,):
            raise ValueError(
                f"layer {index}: masks of shape {tuple(head_mask.shape)}, {tuple(neuron_mask.shape)} "
                f"do not match its {parts.num_heads} heads and {parts.num_neurons} neurons"
            )
        head_mask, neuron_mask = head_mask.detach(), neuron_mask.detach()
        heads = torch.nonzero(head_mask).flatten()  # (kept heads,)
        neurons = torch.nonzero(neuron_mask).flatten()  # (kept neurons,)
        prune_layer(parts.layer, adapter.layout, config, heads, neurons, head_mask[heads], neuron_mask[neurons])
    setattr(config, STRUCTURE_KEY, adapter.structure())
