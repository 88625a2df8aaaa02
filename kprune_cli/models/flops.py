"""The FLOPs model of the paper and both official codes (docs/design.md, "FLOPs").

Only the prunable units are counted: per head the Q/K/V projections, the attention
scores and weighted sum, and its share of the output projection; per FFN neuron its
input row(s) and output column (a gated FFN's neuron has two input rows, value and gate). Embeddings, biases, LayerNorms, activations and the task
head are not counted. ``seq_len`` is the task's average sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping


@dataclass(frozen=True)
class FlopsModel:
    """FLOPs of one head and one neuron at sequence length ``seq_len``; ``neuron_inputs``: input
    rows per neuron (1, or 2 in a gated FFN)."""

    hidden_size: int
    head_size: int
    seq_len: float
    neuron_inputs: int = 1

    @property
    def head(self) -> float:
        """F_head = 3·2·d·d_h·S + 2·2·S²·d_h + 2·d_h·S·d."""
        d, dh, s = self.hidden_size, self.head_size, self.seq_len
        return 3 * 2 * d * dh * s + 2 * 2 * s * s * dh + 2 * dh * s * d

    @property
    def neuron(self) -> float:
        """F_neuron = 2·(r + 1)·S·d with ``r = neuron_inputs`` (2·2·S·d in the paper's ungated FFN)."""
        return 2 * (self.neuron_inputs + 1) * self.seq_len * self.hidden_size

    def cost(self, kind: str) -> float:
        """FLOPs of one unit of an ``"mha"`` or ``"ffn"`` sub-layer."""
        return self.head if kind == "mha" else self.neuron

    def total(self, structure: Iterable[Mapping[str, int]]) -> float:
        """FLOPs of a model whose layers keep ``[{"heads": h, "neurons": n}, ...]``."""
        return sum(layer["heads"] * self.head + layer["neurons"] * self.neuron for layer in structure)
