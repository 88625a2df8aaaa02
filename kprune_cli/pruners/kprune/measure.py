"""Knowledge measurement (K-prune step 1; DESIGN.md §3).

For every unit of the sub-layers ``≥ s`` of the current (partly pruned) model:

- predictive knowledge ``K_pred = ½ · E_x[(∂ℓ(x)/∂m)²]``: ``ℓ`` is the per-sample distillation
  loss against the teacher's soft targets; ``m`` is a mask entry on one input column of the
  sub-layer's output projection. For a head, the mean over its ``d_h`` columns. The expectation
  is over samples of *per-sample* squared gradients (the official code squares per-batch
  gradients; with batches of one they agree). Per-sample gradients come from one backward
  pass: each column carries a ``(batch, 1, width)`` probe of ones that requires grad, and the
  loss is summed over samples, so the probe's gradient row ``b`` is ``∂ℓ(x_b)/∂m``.
- representational knowledge ``K_rep = E_tokens[x_k²] · mean_j W_out[j, k]²`` over real
  (non-padding) tokens; for a head, the mean over its ``d_h`` columns.

:func:`score` turns knowledge into per-FLOP scores:
``S_head = μ·(λ_rep·K_rep + λ_pred·K_pred)/F_head``, ``S_neuron = (λ_rep·K_rep + λ_pred·K_pred)/F_neuron``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from kprune_cli.flops import FlopsModel
from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.pruners.common import sublayer_kind, sublayer_parts, unit_width
from kprune_cli.pruners.common.hooks import capture_inputs, frozen, scale_inputs
from kprune_cli.pruners.common.teacher import Teacher, distillation_loss


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
            from_sublayer: int) -> Knowledge:
    """Measure the knowledge of every unit of the sub-layers ``≥ from_sublayer`` (one pass over the sample).

    The model runs with ``masks`` applied and its parameters frozen, so the backward pass
    stops at the probes of sub-layer ``from_sublayer``.
    """
    sublayers = range(from_sublayer, 2 * adapter.num_layers)
    projs = {}
    for s in sublayers:
        parts, kind = sublayer_parts(adapter, s)
        projs[s] = parts.out_proj(kind)
    device, dtype = projs[from_sublayer].weight.device, projs[from_sublayer].weight.dtype
    grad_sq = {s: torch.zeros(proj.in_features, dtype=torch.float64, device=device) for s, proj in projs.items()}
    act_sq = {s: torch.zeros(proj.in_features, dtype=torch.float64, device=device) for s, proj in projs.items()}
    num_tokens = 0

    with frozen(model), apply_masks(adapter, masks):
        for batch in teacher.batches:
            probes = {
                s: torch.ones(batch.size, 1, proj.in_features, dtype=dtype, device=device, requires_grad=True)
                for s, proj in projs.items()
            }  # (batch, 1, width)
            with scale_inputs({projs[s]: probes[s] for s in sublayers}), capture_inputs(projs) as acts:
                outputs = model(**batch.inputs)
            loss = distillation_loss(outputs, batch.target, teacher.kind, teacher.temperature, batch.token_mask)
            grads = torch.autograd.grad(loss.sum(), [probes[s] for s in sublayers])
            for s, grad in zip(sublayers, grads):
                grad_sq[s] += grad.squeeze(1).double().pow(2).sum(dim=0)  # (width,)
                act_sq[s] += acts[s].detach()[batch.token_mask].double().pow(2).sum(dim=0)  # (width,)
            num_tokens += int(batch.token_mask.sum())

    predictive, representational = {}, {}
    for s, proj in projs.items():
        parts, kind = sublayer_parts(adapter, s)
        width = unit_width(parts, kind)
        weight_sq = proj.weight.detach().double().pow(2).mean(dim=0)  # (width,): mean_j W[j, k]²
        predictive[s] = (0.5 * grad_sq[s] / teacher.num_samples).view(-1, width).mean(dim=1)
        representational[s] = (act_sq[s] / max(num_tokens, 1) * weight_sq).view(-1, width).mean(dim=1)
    return Knowledge(from_sublayer, predictive, representational)


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
