"""Unit masks: one value per attention head and per FFN neuron, applied through scoped hooks.

A mask multiplies a unit's output where it enters the sub-layer's output projection
(docs/design.md §3): the ``(..., heads * head_size)`` input of ``attn_out`` and the
``(..., neurons)`` input of ``ffn_out``. Hooks live only inside :func:`apply_masks`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from kprune_cli.models.adapters import ModelAdapter


@dataclass
class Masks:
    """Keep-masks of a model: ``heads[l]`` has shape ``(H_l,)``, ``neurons[l]`` ``(N_l,)``.

    Values are usually 0/1; tuning methods (Kwon et al.) may set real values.
    """

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]

    @classmethod
    def ones(cls, adapter: ModelAdapter, device: torch.device | str = "cpu") -> "Masks":
        """All-ones masks matching the model's current structure."""
        layers = adapter.layers()
        return cls(
            heads=[torch.ones(p.num_heads, device=device) for p in layers],
            neurons=[torch.ones(p.num_neurons, device=device) for p in layers],
        )

    def of(self, kind: str) -> list[torch.Tensor]:
        """The per-layer masks of ``"mha"`` (heads) or ``"ffn"`` (neurons)."""
        return self.heads if kind == "mha" else self.neurons

    def clone(self) -> "Masks":
        return Masks([m.detach().clone() for m in self.heads], [m.detach().clone() for m in self.neurons])

    def kept(self) -> list[dict[str, int]]:
        """Non-zero units per layer: ``[{"heads": h, "neurons": n}, ...]``."""
        return [
            {"heads": int((h != 0).sum()), "neurons": int((n != 0).sum())}
            for h, n in zip(self.heads, self.neurons)
        ]


def _scale_input(mask: torch.Tensor, repeat: int):
    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        (hidden,) = args[:1]
        scale = mask.repeat_interleave(repeat) if repeat > 1 else mask
        return (hidden * scale.to(hidden.dtype),) + tuple(args[1:])

    return hook


@contextmanager
def apply_masks(adapter: ModelAdapter, masks: Masks) -> Iterator[None]:
    """Multiply every unit's output by its mask while the context is open.

    Gradients flow to mask tensors that require grad. Hooks are removed on exit, also
    when the body raises.
    """
    handles = []
    try:
        for parts, head_mask, neuron_mask in zip(adapter.layers(), masks.heads, masks.neurons):
            if parts.num_heads:
                handles.append(parts.attn_out.register_forward_pre_hook(_scale_input(head_mask, parts.head_size)))
            if parts.num_neurons:
                handles.append(parts.ffn_out.register_forward_pre_hook(_scale_input(neuron_mask, 1)))
        yield
    finally:
        for handle in handles:
            handle.remove()
