"""Knowledge measurement (K-prune step 1; DESIGN.md §3).

For every unit of the sub-layers ``≥ s`` of the current (partly pruned) model:

- predictive knowledge ``K_pred = ½ · E_x[(∂ℓ(x)/∂m)²]``: ``ℓ`` is the per-sample distillation
  loss against the teacher's soft targets; ``m`` is a mask entry on one input column of the
  sub-layer's output projection. For a head, the mean over its ``d_h`` columns. The expectation
  is over samples of *per-sample* squared gradients (the official code squares per-batch
  gradients; with batches of one they agree). Per-sample gradients come from one backward
  pass of the loss summed over samples: with ``a`` ``(batch, seq, width)`` the projection's
  (masked) input, ``∂ℓ(x_b)/∂m_k = Σ_t ∂ℓ/∂a[b, t, k] · a[b, t, k]`` (the mask multiplies
  column ``k``; row ``b`` of the gradient depends on sample ``b`` only). The backward pass starts
  from the loss and stops at sub-layer ``s``'s projection input, made a leaf that requires grad
  (the parameters are frozen); it gives the gradients of all later projections' inputs too.
- representational knowledge ``K_rep = E_tokens[x_k²] · mean_j W_out[j, k]²`` over real
  (non-padding) tokens; for a head, the mean over its ``d_h`` columns.

:func:`score` turns knowledge into per-FLOP scores:
``S_head = μ·(λ_rep·K_rep + λ_pred·K_pred)/F_head``, ``S_neuron = (λ_rep·K_rep + λ_pred·K_pred)/F_neuron``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedModel

from kprune_cli.flops import FlopsModel
from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.masks import Masks
from kprune_cli.pruners.common import sublayer_kind, sublayer_parts, unit_width
from kprune_cli.pruners.common.hooks import capture_inputs, frozen, grad_leaf_input, scale_inputs
from kprune_cli.pruners.common.teacher import Teacher, distillation_loss
from kprune_cli.pruners.common.window import LayerWindow


@dataclass
class Knowledge:
    """Per-unit knowledge of the sub-layers ``≥ from_sublayer``, float64.

    ``predictive[s]`` and ``representational[s]`` have one entry per unit of sub-layer ``s``
    (``(H_l,)`` or ``(N_l,)``), normalised by samples and by real tokens respectively.
    """

    from_sublayer: int
    predictive: dict[int, torch.Tensor]
    representational: dict[int, torch.Tensor]


def measure(model: PreTrainedModel, adapter: ModelAdapter, masks: Masks, teacher: Teacher,
            from_sublayer: int, hidden: Sequence[torch.Tensor] | None = None,
            autocast: torch.dtype | None = None) -> Knowledge:
    """Measure the knowledge of every unit of the sub-layers ``≥ from_sublayer`` (one pass over the sample).

    The model runs with ``masks`` applied and its parameters frozen, so the backward pass
    stops at sub-layer ``from_sublayer``'s projection input. ``hidden[i]`` ``(batch, seq, d)``:
    the hidden states entering layer ``from_sublayer // 2`` on ``teacher.batches[i]``, with the
    same masks; the passes then start there (see
    :class:`~kprune_cli.pruners.common.window.LayerWindow`), else at the embeddings.
    ``autocast`` (``torch.bfloat16`` or ``torch.float16``): run the forward pass (and so the
    backward) under :func:`torch.autocast` in that dtype; faster where the hardware has
    half-precision units, at the price of slightly different scores (float16 may also flush
    gradients below ~6e-8 to zero). Knowledge is accumulated in float64 either way.
    """
    sublayers = range(from_sublayer, 2 * adapter.num_layers)
    projs = {}
    for s in sublayers:
        parts, kind = sublayer_parts(adapter, s)
        projs[s] = parts.out_proj(kind)
    device = projs[from_sublayer].weight.device
    grad_sq = {s: torch.zeros(proj.in_features, dtype=torch.float64, device=device) for s, proj in projs.items()}
    act_sq = {s: torch.zeros(proj.in_features, dtype=torch.float64, device=device) for s, proj in projs.items()}
    num_tokens = 0

    start = from_sublayer // 2 if hidden is not None else 0
    precision = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    with frozen(model), scale_inputs(_mask_scales(adapter, masks)), grad_leaf_input(projs[from_sublayer]), \
            LayerWindow(model, adapter, start) as window:
        for index, batch in enumerate(teacher.batches):
            with capture_inputs(projs) as acts, precision:  # (batch, seq, width) each
                outputs = window(batch.inputs, hidden[index] if hidden is not None else None)
                loss = distillation_loss(outputs, batch.target, teacher.kind, teacher.temperature, batch.token_mask)
            grads = torch.autograd.grad(loss.sum(), [acts[s] for s in sublayers])
            for s, grad in zip(sublayers, grads):
                act = _full_precision(acts[s].detach())
                grad_sq[s] += (_full_precision(grad) * act).sum(dim=1).double().pow(2).sum(dim=0)  # (width,)
                act_sq[s] += _squares(act[batch.token_mask]).sum(dim=0)  # (width,)
            num_tokens += int(batch.token_mask.sum())

    predictive, representational = {}, {}
    for s, proj in projs.items():
        parts, kind = sublayer_parts(adapter, s)
        width = unit_width(parts, kind)
        weight_sq = _squares(proj.weight.detach()).mean(dim=0)  # (width,): mean_j W[j, k]²
        predictive[s] = (0.5 * grad_sq[s] / teacher.num_samples).view(-1, width).mean(dim=1)
        representational[s] = (act_sq[s] / max(num_tokens, 1) * weight_sq).view(-1, width).mean(dim=1)
    return Knowledge(from_sublayer, predictive, representational)


def _full_precision(values: torch.Tensor) -> torch.Tensor:
    """``values`` in float32 if autocast made them half precision, else as they are."""
    return values.float() if values.dtype in (torch.float16, torch.bfloat16) else values


def _squares(values: torch.Tensor) -> torch.Tensor:
    """Element-wise squares in float64 (exact for float32 values), computed in place on a copy."""
    copy = values.to(torch.float64, copy=True)
    return copy.mul_(copy)


def _mask_scales(adapter: ModelAdapter, masks: Masks) -> dict[torch.nn.Module, torch.Tensor]:
    """The masks as input scales of the output projections ``(width,)``, as
    :func:`~kprune_cli.models.masks.apply_masks` applies them, leaving out all-ones masks
    (multiplying by one changes nothing, forward or backward, and costs a pass over the activations)."""
    scales = {}
    for parts, heads, neurons in zip(adapter.layers(), masks.heads, masks.neurons):
        for kind, mask in (("mha", heads), ("ffn", neurons)):
            if mask.numel() and not bool((mask == 1).all()):
                scales[parts.out_proj(kind)] = mask.repeat_interleave(unit_width(parts, kind))
    return scales


def score(knowledge: Knowledge, masks: Masks, flops: FlopsModel, lambda_pred: float, lambda_rep: float,
          mu: float) -> dict[int, torch.Tensor]:
    """Per-FLOP importance of every unit, by sub-layer; units already pruned score ``-inf``.

    Heads: ``μ·(λ_rep·K_rep + λ_pred·K_pred)/F_head``; neurons: ``(λ_rep·K_rep + λ_pred·K_pred)/F_neuron``.
    """
    scores = {}
    for s, predictive in knowledge.predictive.items():
        kind = sublayer_kind(s)
        weight = (mu if kind == "mha" else 1.0) / flops.cost(kind)
        value = weight * (lambda_rep * knowledge.representational[s] + lambda_pred * predictive)
        alive = masks.of(kind)[s // 2].to(value.device) != 0
        scores[s] = torch.where(alive, value, torch.full_like(value, float("-inf")))
    return scores
