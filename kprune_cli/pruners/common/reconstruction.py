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
when the hidden states entering that layer are cached).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedModel

from kprune_cli.models.adapters import ModelAdapter, Tap
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.pruners.common import sublayer_parts, unit_width
from kprune_cli.pruners.common.hooks import capture_taps
from kprune_cli.pruners.common.window import LayerWindow


@dataclass
class TokenBatch:
    """One micro-batch: model ``inputs`` on the device, ``(batch, seq)``, and ``token_mask``
    ``(batch, seq)`` bool, True on the tokens a reconstruction counts (real tokens, or [CLS] only)."""

    inputs: dict[str, torch.Tensor]
    token_mask: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.token_mask.shape[0])


@dataclass
class SublayerActivations:
    """On the selected tokens: the sub-layer's input ``x`` ``(tokens, d)``, its output projection's
    input ``a`` ``(tokens, width)`` (masks applied) and the residual sum ``y`` ``(tokens, d)``."""

    x: torch.Tensor
    a: torch.Tensor
    y: torch.Tensor


@dataclass
class NormalEquations:
    """``gram = AᵀA`` ``(k, k)`` and ``rhs = Aᵀ(Y − X − b)`` ``(k, d)`` in float64, over the
    ``columns`` ``(k,)`` of the output projection that belong to surviving units; ``a_sum = Σ_tokens A``
    ``(k,)``, ``residual_sum = Σ_tokens (Y − X − b)`` ``(d,)`` and ``tokens`` (their count) let an
    affine fit centre the system (:mod:`~kprune_cli.pruners.common.affine`)."""

    gram: torch.Tensor
    rhs: torch.Tensor
    columns: torch.Tensor
    a_sum: torch.Tensor
    residual_sum: torch.Tensor
    tokens: int


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
    the embeddings, or with ``hidden`` ``(batch, seq, d)`` entering the sub-layer's layer."""
    parts, kind = sublayer_parts(adapter, sublayer)
    taps = {"x": parts.input_tap(kind), "a": Tap(parts.out_proj(kind)), "y": parts.sum_tap(kind)}
    start = sublayer // 2 if hidden is not None else 0
    with apply_masks(adapter, masks), capture_taps(taps) as acts, LayerWindow(model, adapter, start) as window:
        window.until(batch.inputs, taps["y"], hidden)
    return SublayerActivations(*(acts[key][batch.token_mask] for key in ("x", "a", "y")))


def normal_equations(model: PreTrainedModel, adapter: ModelAdapter, masks: Masks, batches: Sequence[TokenBatch],
                     targets: Sequence[torch.Tensor], sublayer: int,
                     hidden: Sequence[torch.Tensor] | None = None) -> NormalEquations:
    """Accumulate the normal equations of ``sublayer`` over the micro-batches.

    ``targets[i]``: the reference residual sum ``Y`` on the selected tokens of ``batches[i]``;
    ``hidden[i]`` (optional): the hidden states entering the sub-layer's layer on ``batches[i]``,
    with ``masks`` applied, so the passes start there instead of at the embeddings.
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
    bias = proj.bias.detach() if proj.bias is not None else 0.0
    for index, (batch, target) in enumerate(zip(batches, targets)):
        acts = sublayer_activations(model, adapter, masks, batch, sublayer,
                                    hidden[index] if hidden is not None else None)
        a = acts.a[:, columns].double()  # (tokens, k)
        residual = (target - acts.x - bias).double()  # (tokens, d)
        gram += a.T @ a
        rhs += a.T @ residual
        a_sum += a.sum(dim=0)
        residual_sum += residual.sum(dim=0)
        tokens += a.shape[0]
    return NormalEquations(gram, rhs, columns, a_sum, residual_sum, tokens)
