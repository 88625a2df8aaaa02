"""The reconstruction system of one sub-layer, shared by K-prune's weight-tuning and Kwon et al.'s mask tuning.

After pruning, a sub-layer ``s`` of the student should still produce the reference model's
residual sum ``Y`` on the sample's tokens (the input of the LayerNorm after the sub-layer in a
post-LN family; in a pre-norm one, the residual stream after the sub-layer: see
:meth:`~kprune_cli.models.adapters.LayerParts.sum_tap`). With ``X`` ``(tokens, d)`` the sub-layer's
input (the residual stream entering it), ``A`` ``(tokens, k)`` the surviving units' activations (the output projection's input, masks
applied) and ``b`` the projection's bias, both methods fit a least-squares problem whose normal
equations are built from

    gram = AᵀA   (k, k)        rhs = Aᵀ(Y − X − b)   (k, d)

K-prune solves them for the survivors' projection columns; Kwon et al. contract them with the
projection's weights to solve for one scale per unit. Both are accumulated in float64 over
micro-batches of a forward pass that stops right after the sub-layer (and starts at its layer
when the hidden states entering that layer are cached). The products of one micro-batch are
float64 too (``gram_precision="float64"``), or float32 products added up in float64
(``"float32"``: on GPUs whose float64 runs at 1/32 to 1/64 of float32, the float64 GEMMs would
cost more than the rest of the pruning; the activations are float32 either way).

On request the same pass also keeps the equations of each of ``folds`` interleaved parts of the
micro-batches (:class:`FoldEquations`), from which :mod:`~kprune_cli.pruners.common.held_out`
computes a fit's error on the part it did not see, with no further pass. The total is still the
running sum over all micro-batches, so asking for folds does not change it by a bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import torch
from transformers import PreTrainedModel

from kprune_cli.models.adapters import ModelAdapter, Tap
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.models.precision import full_precision
from kprune_cli.pruners.common import sublayer_parts, unit_width
from kprune_cli.pruners.common.hooks import capture_taps
from kprune_cli.pruners.common.window import LayerWindow
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.hardware import fast_float64


@dataclass
class TokenBatch:
    """One micro-batch: model ``inputs`` on the device, ``(batch, seq)``, and ``token_mask``
    ``(batch, seq)`` bool, True on the tokens a reconstruction counts (real tokens, or [CLS] only)."""

    inputs: dict[str, torch.Tensor]
    token_mask: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.token_mask.shape[0])

    @cached_property
    def token_index(self) -> torch.Tensor:
        """``(tokens,)`` long: the selected tokens' places in the flattened ``(batch * seq)`` positions.
        Found once per batch (a data-dependent size: one host sync on a GPU); :meth:`select` then
        needs none, where indexing with the boolean mask would sync at every pass."""
        return self.token_mask.flatten().nonzero().squeeze(1)

    @property
    def num_tokens(self) -> int:
        """The number of selected tokens."""
        return int(self.token_index.numel())

    def select(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` ``(batch, seq, ...)`` on the selected tokens, ``(tokens, ...)`` in row-major order:
        ``values[token_mask]``, the same values."""
        return values.flatten(0, 1).index_select(0, self.token_index)


@dataclass
class SublayerActivations:
    """On the selected tokens: the sub-layer's input ``x`` ``(tokens, d)``, its output projection's
    input ``a`` ``(tokens, width)`` (masks applied) and the residual sum ``y`` ``(tokens, d)``."""

    x: torch.Tensor
    a: torch.Tensor
    y: torch.Tensor


@dataclass
class FoldEquations:
    """The normal equations of one fold (every ``folds``-th micro-batch): ``gram`` ``(k, k)``, ``rhs``
    ``(k, d)`` as in :class:`NormalEquations`, and ``energy`` ``()`` = ``Σ ||Y − X − b||²`` over its
    tokens, so that any fit's squared error on the fold follows from them (float64)."""

    gram: torch.Tensor
    rhs: torch.Tensor
    energy: torch.Tensor


@dataclass
class NormalEquations:
    """``gram = AᵀA`` ``(k, k)`` and ``rhs = Aᵀ(Y − X − b)`` ``(k, d)`` in float64, over the
    ``columns`` ``(k,)`` of the output projection that belong to surviving units; ``a_sum = Σ_tokens A``
    ``(k,)``, ``residual_sum = Σ_tokens (Y − X − b)`` ``(d,)`` and ``tokens`` (their count) let an
    affine fit centre the system (:mod:`~kprune_cli.pruners.common.affine`); ``folds``: the
    equations of each fold when asked for (empty otherwise)."""

    gram: torch.Tensor
    rhs: torch.Tensor
    columns: torch.Tensor
    a_sum: torch.Tensor
    residual_sum: torch.Tensor
    tokens: int
    folds: list[FoldEquations] = field(default_factory=list)


def kept_columns(adapter: ModelAdapter, masks: Masks, sublayer: int) -> torch.Tensor:
    """Indices of the output projection's input columns whose unit has a non-zero mask."""
    parts, kind = sublayer_parts(adapter, sublayer)
    mask = masks.of(kind)[sublayer // 2]
    return (mask.repeat_interleave(unit_width(parts, kind)) != 0).nonzero().squeeze(1)


@torch.no_grad()
def sublayer_activations(model: PreTrainedModel, adapter: ModelAdapter, masks: Masks, batch: TokenBatch,
                         sublayer: int, hidden: torch.Tensor | None = None) -> SublayerActivations:
    """What ``sublayer`` sees and produces on ``batch``'s selected tokens with ``masks`` applied,
    from a forward pass that stops where the sub-layer's residual sum is read. The pass starts at
    the embeddings, or with ``hidden`` ``(batch, seq, d)`` entering the sub-layer's layer.
    Half-precision values (a pass under :func:`~kprune_cli.models.precision.autocast_forward`)
    come back float32."""
    parts, kind = sublayer_parts(adapter, sublayer)
    taps = {"x": parts.input_tap(kind), "a": Tap(parts.out_proj(kind)), "y": parts.sum_tap(kind)}
    start = sublayer // 2 if hidden is not None else 0
    with apply_masks(adapter, masks), capture_taps(taps) as acts, LayerWindow(model, adapter, start) as window:
        window.until(batch.inputs, taps["y"], hidden)
    return SublayerActivations(*(full_precision(batch.select(acts[key])) for key in ("x", "a", "y")))


GRAM_PRECISIONS = ("auto", "float64", "float32")
"""Values of a pruner's ``gram_precision``: the products of one micro-batch's normal equations."""


def check_gram_precision(value: str) -> str:
    """``value`` if it is one of :data:`GRAM_PRECISIONS`, else a :class:`UserError`."""
    if value not in GRAM_PRECISIONS:
        raise UserError(f"pruner.gram_precision={value!r}: choose {' | '.join(GRAM_PRECISIONS)}")
    return value


def resolve_gram_precision(setting: str, device: torch.device) -> str:
    """``"float64"`` or ``"float32"`` for ``setting`` on ``device``: ``"auto"`` is float64 except on a
    CUDA GPU with slow float64 (:func:`~kprune_cli.runtime.hardware.fast_float64`), so the CPU
    and datacenter GPUs keep the float64 products."""
    if setting != "auto":
        return setting
    return "float64" if fast_float64(device) else "float32"


def gram_precision_notes(setting: str, precision: str) -> list[str]:
    """The report's note when the normal equations use float32 products (``precision``, resolved from
    the pruner's ``setting``)."""
    if precision != "float32":
        return []
    why = "as float64 is slow on this device" if setting == "auto" else "as pruner.gram_precision=float32 asked"
    return [f"gram_precision: the normal equations were accumulated from float32 products (summed in float64), "
            f"{why}; gram_precision=float64 gives the float64 products"]


def normal_equations(model: PreTrainedModel, adapter: ModelAdapter, masks: Masks, batches: Sequence[TokenBatch],
                     targets: Sequence[torch.Tensor], sublayer: int,
                     hidden: Sequence[torch.Tensor] | None = None, precision: str = "float64",
                     folds: int = 0) -> NormalEquations:
    """Accumulate the normal equations of ``sublayer`` over the micro-batches.

    ``targets[i]``: the reference residual sum ``Y`` on the selected tokens of ``batches[i]``;
    ``hidden[i]`` (optional): the hidden states entering the sub-layer's layer on ``batches[i]``,
    with ``masks`` applied, so the passes start there instead of at the embeddings.
    ``precision``: of one micro-batch's products, ``"float64"`` or ``"float32"`` (summed in float64).
    ``folds`` (≥ 2, and at most the number of micro-batches): also keep the equations of micro-batches
    ``i ≡ f (mod folds)`` for each fold ``f``; 0: none.
    """
    parts, kind = sublayer_parts(adapter, sublayer)
    proj = parts.out_proj(kind)
    columns = kept_columns(adapter, masks, sublayer)
    k, d = columns.numel(), proj.out_features
    gram = torch.zeros(k, k, dtype=torch.float64, device=proj.weight.device)
    rhs = torch.zeros(k, d, dtype=torch.float64, device=proj.weight.device)
    a_sum = torch.zeros(k, dtype=torch.float64, device=proj.weight.device)
    residual_sum = torch.zeros(d, dtype=torch.float64, device=proj.weight.device)
    tokens = 0
    fold_systems = [FoldEquations(torch.zeros_like(gram), torch.zeros_like(rhs), gram.new_zeros(()))
                    for _ in range(folds if 2 <= folds <= len(batches) else 0)]
    bias = proj.bias.detach() if proj.bias is not None else 0.0
    for index, (batch, target) in enumerate(zip(batches, targets)):
        acts = sublayer_activations(model, adapter, masks, batch, sublayer,
                                    hidden[index] if hidden is not None else None)
        a = acts.a[:, columns]  # (tokens, k)
        residual = target - acts.x - bias  # (tokens, d)
        if precision == "float64":
            a, residual = a.double(), residual.double()
        batch_gram, batch_rhs = (a.T @ a).double(), (a.T @ residual).double()
        gram += batch_gram
        rhs += batch_rhs
        a_sum += a.double().sum(dim=0)
        residual_sum += residual.double().sum(dim=0)
        tokens += a.shape[0]
        if fold_systems:
            fold = fold_systems[index % len(fold_systems)]
            fold.gram += batch_gram
            fold.rhs += batch_rhs
            fold.energy += residual.double().pow(2).sum()
    return NormalEquations(gram, rhs, columns, a_sum, residual_sum, tokens, fold_systems)
