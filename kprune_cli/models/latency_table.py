"""A measured latency table and the cost model the mask searches spend it through (``constraint=latency``).

The table describes one model shape on one runtime (runtime, device, threads, batch size, sequence
length: its ``fingerprint``) as an additive model of whole-model latency::

    raw(structure) = fixed_ms + Σ_l [empty_layer_ms + mha_ms(h_l) + ffn_ms(n_l)]
    predicted(structure) = scale · raw(structure) + offset

``fixed_ms``: the model without its layers (embeddings, task head); ``empty_layer_ms``: one layer with
both sub-layers emptied (their residual paths, biases and LayerNorms still run, as a pruned
checkpoint runs them; the two emptied sub-layers of a layer are only ever timed together);
``mha_ms(h)`` / ``ffn_ms(n)``: what ``h`` kept heads / ``n`` kept neurons add over the emptied
sub-layer (``mha_ms(0) = ffn_ms(0) = 0``), non-decreasing (smoothed), the FFN's measured on a grid
of widths and interpolated linearly between its points. ``scale`` and ``offset`` come from the
additivity check (:mod:`kprune_cli.core.latency_table`), which times whole models.

:class:`LatencyCost` gives the searches the interface of
:class:`~kprune_cli.models.flops.FlopsModel` (:class:`~kprune_cli.models.flops.CostModel`): the cost of each further kept unit of a sub-layer,
which for a latency table depends on how many the sub-layer already keeps.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import torch


@dataclass(frozen=True)
class LatencyTable:
    """Milliseconds of one model shape's parts on one runtime (see the module docstring).

    ``mha_ms``: ``(H + 1,)``, index = kept heads; ``ffn_widths``: the measured FFN widths, ascending
    from 0 to N; ``ffn_ms``: their times. ``fit``: the additivity check's figures (``r2``,
    ``worst_error``, ``configurations``), ``checks`` its models' ``raw_ms`` (the table's sum) and
    ``measured_ms``; ``fingerprint``: what the table is valid for.
    """

    fingerprint: dict[str, Any]
    num_layers: int
    fixed_ms: float
    empty_layer_ms: float
    mha_ms: tuple[float, ...]
    ffn_widths: tuple[int, ...]
    ffn_ms: tuple[float, ...]
    scale: float = 1.0
    offset: float = 0.0
    fit: dict[str, float] = field(default_factory=dict)
    checks: tuple[dict[str, float], ...] = ()

    def __post_init__(self) -> None:
        if len(self.ffn_widths) != len(self.ffn_ms) or self.ffn_widths[0] != 0 or self.mha_ms[0] != 0:
            raise ValueError("a latency table's widths start at 0 with 0 ms and match its times")

    @property
    def num_heads(self) -> int:
        return len(self.mha_ms) - 1

    @property
    def num_neurons(self) -> int:
        return self.ffn_widths[-1]

    def full_width(self, kind: str) -> int:
        """The units of a full sub-layer of ``kind``: H heads or N neurons."""
        return self.num_heads if kind == "mha" else self.num_neurons

    def sublayer_ms(self, kind: str, width: int) -> float:
        """What a sub-layer of ``kind`` keeping ``width`` units adds over its emptied self (unscaled)."""
        if kind == "mha":
            return self.mha_ms[width]
        if width >= self.num_neurons:
            return self.ffn_ms[-1]
        right = bisect.bisect_right(self.ffn_widths, width)
        (x0, x1), (y0, y1) = self.ffn_widths[right - 1:right + 1], self.ffn_ms[right - 1:right + 1]
        return y0 + (y1 - y0) * (width - x0) / (x1 - x0)

    def raw_ms(self, structure: Iterable[Mapping[str, int]]) -> float:
        """The table's sum for a model whose layers keep ``[{"heads": h, "neurons": n}, ...]``."""
        return self.fixed_ms + sum(self.empty_layer_ms + self.sublayer_ms("mha", layer["heads"])
                                   + self.sublayer_ms("ffn", layer["neurons"]) for layer in structure)

    def predict_ms(self, structure: Iterable[Mapping[str, int]]) -> float:
        """Predicted milliseconds of a whole model of ``structure``: ``scale · raw + offset``."""
        return self.scale * self.raw_ms(structure) + self.offset

    def emptied(self) -> list[dict[str, int]]:
        """The structure with every sub-layer emptied: the fastest model the table allows."""
        return [{"heads": 0, "neurons": 0}] * self.num_layers

    def full(self) -> list[dict[str, int]]:
        """The dense structure."""
        return [{"heads": self.num_heads, "neurons": self.num_neurons}] * self.num_layers

    def reachable_speedup(self, structure: list[dict[str, int]]) -> float:
        """The largest predicted speedup over ``structure``: every sub-layer emptied."""
        return self.predict_ms(structure) / self.predict_ms(self.emptied())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LatencyTable":
        values = dict(data)
        for key in ("mha_ms", "ffn_widths", "ffn_ms", "checks"):
            values[key] = tuple(values[key])
        return cls(**values)


class LatencyCost:
    """A :class:`LatencyTable` as a :class:`~kprune_cli.models.flops.CostModel`: costs in predicted milliseconds (the table's
    times times its ``scale``), each sub-layer's counted over its emptied self."""

    def __init__(self, table: LatencyTable) -> None:
        self.table = table

    def cost(self, kind: str) -> float:
        """Milliseconds per unit of a full sub-layer of ``kind`` (the average, for per-cost scores)."""
        width = self.table.full_width(kind)
        return self.kept_cost(kind, width) / width

    def unit_costs(self, kind: str, units: int) -> torch.Tensor:
        steps = torch.tensor([self.kept_cost(kind, width) for width in range(units + 1)], dtype=torch.float64)
        return steps.diff()

    def kept_cost(self, kind: str, kept: int) -> float:
        return self.table.scale * self.table.sublayer_ms(kind, kept)

    def priced_width(self, kind: str, kept: int) -> int:
        """``kept`` heads (every head count is timed); for an FFN, the largest timed width ``≤ kept``.

        The table times FFN widths every ``latency.ffn_step`` neurons and interpolates between them,
        but runtimes have steps finer than that: in PyTorch eager on an AVX2 CPU, widths that are not a
        multiple of 8 ran 15-20% slower than the multiple of 8 below them (MiniLM's FFN at batch 32 × 53
        tokens, 2 threads: 1400 neurons 27.4 ms, 1401-1407 31.4-34.8 ms). A search that keeps only
        timed widths runs at the table's own times, with no interpolation to be wrong.
        """
        if kind == "mha" or kept >= self.table.num_neurons:
            return kept
        return self.table.ffn_widths[bisect.bisect_right(self.table.ffn_widths, kept) - 1]

    def by_width(self, kind: str) -> list[float]:
        """:meth:`kept_cost` of a sub-layer of ``kind`` keeping 0, 1, ... all of its units."""
        return [self.kept_cost(kind, kept) for kept in range(self.table.full_width(kind) + 1)]

    def budget(self, rate: float, structure: list[dict[str, int]]) -> float:
        """Milliseconds the kept units may add to the emptied model so that the whole model takes
        ``1 - rate`` of ``structure``'s predicted time (negative: out of reach)."""
        return (1.0 - rate) * self.table.predict_ms(structure) - self.table.predict_ms(self.table.emptied())

    def total(self, structure: Iterable[Mapping[str, int]]) -> float:
        """What the kept units of ``structure`` cost over the emptied model."""
        return sum(self.kept_cost("mha", layer["heads"]) + self.kept_cost("ffn", layer["neurons"])
                   for layer in structure)
