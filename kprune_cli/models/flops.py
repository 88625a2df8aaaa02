"""The FLOPs model of the paper and both official codes (docs/design.md, "FLOPs").

Only the prunable units are counted: per head the Q/K/V projections, the attention
scores and weighted sum, and its share of the output projection; per FFN neuron its
input row(s) and output column (a gated FFN's neuron has two input rows, value and gate). Embeddings, biases, LayerNorms, activations and the task
head are not counted. ``seq_len`` is the task's average sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol

import torch


class CostModel(Protocol):
    """What a mask search spends its budget through: :class:`~kprune_cli.models.flops.FlopsModel` or
    :class:`~kprune_cli.models.latency_table.LatencyCost`."""

    def cost(self, kind: str) -> float:
        """The average cost of one unit of an ``"mha"`` or ``"ffn"`` sub-layer (scores are per unit of it)."""

    def unit_costs(self, kind: str, units: int) -> torch.Tensor:
        """``(units,)`` float64: the cost added by a sub-layer's 1st, 2nd, ... kept unit."""

    def kept_cost(self, kind: str, kept: int) -> float:
        """The cost of a sub-layer of ``kind`` that keeps ``kept`` units, over its emptied self."""

    def priced_width(self, kind: str, kept: int) -> int:
        """The largest width ``≤ kept`` whose cost was priced, not interpolated: a search that chose
        ``kept`` units of a sub-layer of ``kind`` keeps this many."""

    def budget(self, rate: float, structure: list[dict[str, int]]) -> float:
        """What the kept units may cost at ``rate`` for a model of ``structure``."""


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

    def unit_costs(self, kind: str, units: int) -> torch.Tensor:
        """``(units,)`` float64: every kept unit costs :meth:`cost` FLOPs."""
        return torch.full((units,), self.cost(kind), dtype=torch.float64)

    def kept_cost(self, kind: str, kept: int) -> float:
        return float(kept) * self.cost(kind)

    def priced_width(self, kind: str, kept: int) -> int:
        """Every width is priced: ``kept``."""
        return kept

    def budget(self, rate: float, structure: Iterable[Mapping[str, int]]) -> float:
        """``(1 - rate)`` of ``structure``'s FLOPs: the paper's constraint."""
        return (1.0 - rate) * self.total(structure)
