"""Layer-wise mask tuning by linear least squares (Kwon et al., step d).

The search and rearrangement decide which units survive; tuning then gives every survivor of a
sub-layer a real-valued mask so that the student's residual sum matches the reference
model's on the sample. With mask values ``m`` the sub-layer's output is
``X + Σ_k m_k·c_k + b``, where ``c_k(t) = W_k a_k(t)`` is unit ``k``'s contribution at token ``t``
(``W_k``: its ``d_h`` columns of the output projection, or one column for a neuron). Scaling the
current masks by ``f`` (``m_k ← f_k·m_k``) is linear in ``f``:

    min_f Σ_t ‖Σ_k f_k·c_k(t) − (Y_ref(t) − X(t) − b)‖²

whose normal equations, per unit blocks of width ``w``, are contractions of the sub-layer's
reconstruction system (:mod:`kprune_cli.pruners.common.reconstruction`) with the projection
weights: ``G = blocksum_w(AᵀA ∘ WᵀW)`` ``(units, units)`` and ``r = blocksum_w(rowsum(Aᵀ(Y−X−b) ∘ Wᵀ))``
``(units,)``. They are solved by :func:`~kprune_cli.pruners.common.lstsq.solve_ridge` with a small
relative ridge towards ``f = 1`` (the untuned masks). Sub-layers are tuned bottom-up, each on the
student as tuned so far; :class:`LayerwiseTuning` keeps the student's hidden states entering the
next layer and walks the reference's residual sums up with it, so every pass starts at the layer
being tuned (:mod:`kprune_cli.pruners.common.window`), as the official code caches layer inputs.

Official details matched: the reference is the model under the masks searched at the milder
budget ``sqrt(kept fraction)`` (their ``get_pruning_schedule(target, 2)[0]``, not rearranged), or,
with ``teacher="original"``, the unpruned model; scales beyond ±10 (:data:`MAX_SCALE`) are
rejected; for classification and regression the last FFN is reconstructed on the first ([CLS])
token only. Differences, by design: every sub-layer is tuned (theirs skips the first MHA); a
rejected or failed solve keeps that sub-layer's untuned masks and adds a note, and tuning goes on
(theirs stops tuning altogether); a Cholesky solve with a relative ridge (theirs: LSMR with
damping 1 on the normal equations, also regularising towards ``f = 1``); no constant offset column
in the MHA system (theirs fits one and then discards it).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from transformers import PreTrainedModel

from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.pruners.common import sublayer_parts, unit_width
from kprune_cli.pruners.common.lstsq import DEFAULT_RIDGE, solve_ridge
from kprune_cli.pruners.common.reconstruction import NormalEquations, TokenBatch, normal_equations
from kprune_cli.pruners.common.teacher import ResidualSums
from kprune_cli.pruners.common.window import advance, encoder_inputs
from kprune_cli.tasks.kinds import get_kind

MAX_SCALE = 10.0
"""Tuned mask values beyond ``±MAX_SCALE`` are rejected (the official code's bound)."""

TUNE_RIDGE = DEFAULT_RIDGE
"""Relative ridge of the solve (``λ = TUNE_RIDGE · mean(diag(G))``), towards the untuned masks."""


def teacher_budget(budget: float, total: float) -> float:
    """FLOPs kept by the official tuning reference: ``total · sqrt(budget / total)``."""
    return math.sqrt(budget * total)


def first_token_only(sublayer: int, num_sublayers: int, task_kind: str) -> bool:
    """Whether ``sublayer`` is reconstructed on the first ([CLS]) token only: the last FFN of a model whose
    head reads that token alone (classification, regression; the kind says so)."""
    return sublayer == num_sublayers - 1 and get_kind(task_kind).prediction_reads_first_token


def first_tokens(batches: Sequence[TokenBatch], sums: Sequence[torch.Tensor]
                 ) -> tuple[list[TokenBatch], list[torch.Tensor]]:
    """``batches`` selecting the first token of every sequence, and the rows of ``sums`` (per batch,
    ``(real tokens, d)``, in order) that belong to it. Right padding: the first token is real."""
    selected, rows = [], []
    for batch, values in zip(batches, sums):
        token_mask = torch.zeros_like(batch.token_mask)
        token_mask[:, 0] = True
        lengths = batch.token_mask.sum(dim=1)  # (batch,)
        selected.append(TokenBatch(batch.inputs, token_mask))
        rows.append(values[lengths.cumsum(dim=0) - lengths])  # (batch, d)
    return selected, rows


def scale_equations(system: NormalEquations, weight: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-unit normal equations ``G`` ``(units, units)`` and ``r`` ``(units, 1)`` of the scales.

    ``weight``: the output projection's weight ``(d, width · all units)``; ``system`` covers the
    kept columns, ``width`` per unit.
    """
    w = weight.detach()[:, system.columns].double()  # (d, k)
    units = system.columns.numel() // width
    gram = (system.gram * (w.T @ w)).view(units, width, units, width).sum(dim=(1, 3))  # (units, units)
    rhs = (system.rhs * w.T).sum(dim=1).view(units, width).sum(dim=1, keepdim=True)  # (units, 1)
    return gram, rhs


def tune_sublayer(model: PreTrainedModel, adapter: ModelAdapter, masks: Masks, batches: Sequence[TokenBatch],
                  targets: Sequence[torch.Tensor], sublayer: int, hidden: Sequence[torch.Tensor] | None = None,
                  ridge: float = TUNE_RIDGE, precision: str = "float64") -> list[str]:
    """Rescale the surviving masks of ``sublayer`` in place so its residual sum matches ``targets``.

    ``targets[i]``: the reference's residual sum on the selected tokens of ``batches[i]``
    ``(tokens, d)``; ``hidden[i]`` (optional): the student's hidden states entering the
    sub-layer's layer (else the passes start at the embeddings); ``precision``: of the normal
    equations' per-micro-batch products. Returns notes for the report:
    empty on a clean solve, one line when the ridge had to grow, or when the solve failed or gave
    a scale beyond ±:data:`MAX_SCALE` (the masks are then left untuned).
    """
    system = normal_equations(model, adapter, masks, batches, targets, sublayer, hidden, precision)
    if system.columns.numel() == 0:
        return []  # no survivors: nothing to scale
    parts, kind = sublayer_parts(adapter, sublayer)
    gram, rhs = scale_equations(system, parts.out_proj(kind).weight, unit_width(parts, kind))
    result = solve_ridge(gram, rhs, torch.ones_like(rhs), ridge)
    where = f"mask tuning sub-layer {sublayer} ({kind.upper()} of layer {sublayer // 2})"
    if result.solution is None:
        return [f"{where}: least squares failed up to relative ridge {result.ridge:g} "
                f"(singular or non-finite system); masks left untuned"]
    scales = result.solution.squeeze(1)  # (units,)
    largest = float(scales.abs().max())
    if largest > MAX_SCALE:
        return [f"{where}: a tuned scale of magnitude {largest:.3g} exceeds {MAX_SCALE:g}; masks left untuned"]
    mask = masks.of(kind)[sublayer // 2]
    kept = mask != 0
    mask[kept] = mask[kept] * scales.to(mask)
    if result.fell_back:
        return [f"{where}: solved only with relative ridge {result.ridge:g} "
                f"({result.attempts - 1} fallback(s) from {ridge:g})"]
    return []


class LayerwiseTuning:
    """Mask tuning of ``masks`` towards the model under ``reference``, one layer at a time, bottom-up.

    Keeps the student's hidden states entering the next layer and the reference's residual sums
    (:class:`~kprune_cli.pruners.common.teacher.ResidualSums` under ``reference``'s masks): every
    layer runs about four times in all (reference, MHA, FFN, advance) instead of one truncated
    pass from the embeddings per sub-layer. The model's weights must not change meanwhile.
    ``precision``: of the normal equations' per-micro-batch products.
    """

    def __init__(self, model: PreTrainedModel, adapter: ModelAdapter, masks: Masks, reference: Masks,
                 batches: Sequence[TokenBatch], task_kind: str, precision: str = "float64") -> None:
        self.model, self.adapter, self.masks, self.reference = model, adapter, masks, reference
        self.batches, self.task_kind, self.precision = batches, task_kind, precision
        self._inputs = [batch.inputs for batch in batches]
        self._student = encoder_inputs(model, adapter, self._inputs)  # per batch (batch, seq, d)
        self._reference_sums = ResidualSums(model, batches)
        self._next = 0

    def tune_layer(self, layer: int) -> list[str]:
        """Tune MHA then FFN of ``layer`` (the next one bottom-up); returns the notes."""
        if layer != self._next:
            raise RuntimeError(f"layers are tuned bottom-up: expected layer {self._next}, got {layer}")
        num_sublayers = 2 * self.adapter.num_layers
        notes = []
        for sublayer in (2 * layer, 2 * layer + 1):
            with apply_masks(self.adapter, self.reference):
                targets = self._reference_sums(sublayer)
            batches = self.batches
            if first_token_only(sublayer, num_sublayers, self.task_kind):
                batches, targets = first_tokens(batches, targets)
            notes += tune_sublayer(self.model, self.adapter, self.masks, batches, targets, sublayer, self._student,
                                   precision=self.precision)
        self._student = advance(self.model, self.adapter, self.masks, layer, self._inputs, self._student)
        self._next += 1
        return notes
