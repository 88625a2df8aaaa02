"""Knowledge measurement (K-prune step 1; docs/design.md §3).

For every unit of the sub-layers ``≥ s`` of the current (partly pruned) model:

- predictive knowledge ``K_pred = ½ · E[(∂ℓ/∂m)²]``: ``ℓ`` is the distillation loss against the
  teacher's soft targets; ``m`` is a mask entry on one input column of the sub-layer's output
  projection. For a head, the mean over its ``d_h`` columns. As in the official code, the
  expectation is taken over *gradient batches*: the sample, in the (random) order it was drawn,
  is cut into batches of ``gradient_batch`` sequences (the official code's batch size, 32 for GLUE and
  12 for SQuAD: :mod:`~kprune_cli.pruners.common.gradient_batch`), and
  ``K_pred = ½ · Σ_batches (∂ mean_{x∈batch} ℓ(x) / ∂m)² / N`` over the ``N`` sequences. The
  paper's ``λ_rep`` is tuned to this scale. ``gradient_batch=1`` gives the per-sample average
  ``½ · mean_x (∂ℓ(x)/∂m)²`` instead (the empirical Fisher); its values are at least
  ``gradient_batch`` times larger (Jensen), far more where per-sample gradients of different
  signs cancel in a batch, so at the same ``λ_rep`` the predictive term weighs that much more
  (the README compares the two).
  Per-sample gradients come from one backward pass of the loss summed over the micro-batch:
  with ``a`` ``(batch, seq, width)`` the projection's (masked) input,
  ``∂ℓ(x_b)/∂m_k = Σ_t ∂ℓ/∂a[b, t, k] · a[b, t, k]`` (the mask multiplies column ``k``; row
  ``b`` of the gradient depends on sample ``b`` only); they are then summed per gradient batch,
  so the micro-batches (sorted by length, sized for memory) do not change the result. The
  backward pass starts from the loss and stops at sub-layer ``s``'s projection input, made a
  leaf that requires grad (the parameters are frozen); it gives the gradients of all later
  projections' inputs too.
- representational knowledge ``K_rep = E_tokens[x_k²] · mean_j W_out[j, k]²`` over real
  (non-padding) tokens; for a head, the mean over its ``d_h`` columns.

:func:`score` turns knowledge into per-FLOP scores:
``S_head = μ·(λ_rep·K_rep + λ_pred·K_pred)/F_head``, ``S_neuron = (λ_rep·K_rep + λ_pred·K_pred)/F_neuron``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel

from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.flops import CostModel
from kprune_cli.models.masks import Masks
from kprune_cli.models.precision import autocast_passes, full_precision
from kprune_cli.pruners.common import sublayer_kind, sublayer_parts, unit_width
from kprune_cli.pruners.common.gradient_batch import GLUE_GRADIENT_BATCH
from kprune_cli.pruners.common.hooks import capture_inputs, frozen, grad_leaf_input, scale_inputs
from kprune_cli.pruners.common.teacher import DistillBatch, Teacher, distillation_loss
from kprune_cli.pruners.common.window import LayerWindow

FP16_LOSS_SCALE = 2.0 ** 16
"""Initial loss scale of float16 measurement passes (halved whenever a gradient overflows)."""


class SquaredBatchGradients:
    """``Σ_batches (Σ_{i∈batch} g_i / |batch|)²`` per column ``(width,)``, float64, from per-sample
    gradients ``g_i`` arriving in any order: sequence ``i`` (its draw index) belongs to gradient
    batch ``i // size``. With ``size == 1`` the squares are summed as they come; otherwise one
    running sum per gradient batch is kept, ``(ceil(N / size), width)``."""

    def __init__(self, width: int, size: int, num_samples: int, device: torch.device) -> None:
        self.size = size
        self.squares = torch.zeros(width, dtype=torch.float64, device=device)
        count = math.ceil(num_samples / size) if size > 1 else 0
        starts = torch.arange(count, device=device) * size
        self.batch_sizes = ((starts + size).clamp(max=num_samples) - starts).to(torch.float64)  # (count,)
        self.sums = torch.zeros(count, width, dtype=torch.float64, device=device)

    def add(self, per_sample: torch.Tensor, batch: DistillBatch) -> None:
        """``per_sample`` ``(batch, width)`` float64: the gradients of ``batch``'s sequences."""
        if self.size == 1:
            self.squares += per_sample.pow(2).sum(dim=0)
            return
        batches, membership = batch.gradient_groups(self.size)  # (groups,), (groups, batch)
        self.sums[batches] += membership @ per_sample  # a matmul, not index_add_: deterministic on GPUs too

    def total(self) -> torch.Tensor:
        """``(width,)``: the sum over gradient batches of their squared mean gradient."""
        if self.size == 1:
            return self.squares
        return (self.sums / self.batch_sizes[:, None]).pow(2).sum(dim=0)


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
            autocast: torch.dtype | None = None, gradient_batch: int = GLUE_GRADIENT_BATCH,
            loss_scale: float | None = None) -> Knowledge:
    """Measure the knowledge of every unit of the sub-layers ``≥ from_sublayer`` (one pass over the sample).

    The model runs with ``masks`` applied and its parameters frozen, so the backward pass
    stops at sub-layer ``from_sublayer``'s projection input. ``hidden[i]`` ``(batch, seq, d)``:
    the hidden states entering layer ``from_sublayer // 2`` on ``teacher.batches[i]``, with the
    same masks; the passes then start there (see
    :class:`~kprune_cli.pruners.common.window.LayerWindow`), else at the embeddings.
    ``autocast`` (``torch.bfloat16`` or ``torch.float16``): run the forward pass (and so the
    backward) under :func:`torch.autocast` in that dtype; faster where the hardware has
    half-precision units, at the price of slightly different scores. Knowledge is accumulated in
    float64 either way. On a CPU, autocast passes use eager attention
    (:func:`~kprune_cli.models.precision.autocast_passes`).
    Under float16 the loss is scaled before the backward pass and the gradients unscaled after it
    (``loss_scale``, default :data:`FP16_LOSS_SCALE`, halved and the micro-batch redone whenever a
    gradient overflows): the per-element gradients of a student close to its teacher, 1e-5 to
    1e-8, would otherwise lose their precision in float16 or flush to zero, biasing K_pred
    towards 0. bfloat16 has float32's range and needs no scaling.
    ``gradient_batch``: sequences per squared gradient of predictive knowledge (see the module doc).
    """
    sublayers = range(from_sublayer, 2 * adapter.num_layers)
    projs = {}
    for s in sublayers:
        parts, kind = sublayer_parts(adapter, s)
        projs[s] = parts.out_proj(kind)
    device = projs[from_sublayer].weight.device
    grad_sq = {s: SquaredBatchGradients(proj.in_features, gradient_batch, teacher.num_samples, device)
               for s, proj in projs.items()}
    act_sq = {s: torch.zeros(proj.in_features, dtype=torch.float64, device=device) for s, proj in projs.items()}
    num_tokens = 0

    scale = (loss_scale or FP16_LOSS_SCALE) if autocast == torch.float16 else None
    start = from_sublayer // 2 if hidden is not None else 0
    with frozen(model), scale_inputs(_mask_scales(adapter, masks)), grad_leaf_input(projs[from_sublayer]), \
            LayerWindow(model, adapter, start) as window:
        for index, batch in enumerate(teacher.batches):
            def forward(batch: DistillBatch = batch, index: int = index) -> tuple[torch.Tensor, list[torch.Tensor]]:
                precision = autocast_passes(model, device, autocast) if autocast is not None else nullcontext()
                with capture_inputs(projs) as acts, precision:  # (batch, seq, width) each
                    outputs = window(batch.inputs, hidden[index] if hidden is not None else None)
                    loss = distillation_loss(outputs, batch.target, teacher.kind, teacher.temperature,
                                             batch.token_mask)
                return loss, [acts[s] for s in sublayers]

            acts, grads, scale = scaled_gradients(forward, scale)
            real = batch.token_mask.flatten()[None, :]  # (1, batch * seq): True on real tokens
            for s, grad, captured in zip(sublayers, grads, acts):
                act = full_precision(captured.detach())  # (batch, seq, width)
                per_sample = torch.linalg.vecdot(full_precision(grad), act, dim=1)  # (batch, width)
                if scale is not None:
                    per_sample = per_sample / scale
                grad_sq[s].add(per_sample.double(), batch)
                act_sq[s] += _masked_square_sum(act, real)
            num_tokens += batch.num_tokens

    predictive, representational = {}, {}
    for s, proj in projs.items():
        parts, kind = sublayer_parts(adapter, s)
        width = unit_width(parts, kind)
        weight_sq = proj.weight.detach().double().square().mean(dim=0)  # (width,): mean_j W[j, k]²
        predictive[s] = (0.5 * grad_sq[s].total() / teacher.num_samples).view(-1, width).mean(dim=1)
        representational[s] = (act_sq[s] / max(num_tokens, 1) * weight_sq).view(-1, width).mean(dim=1)
    return Knowledge(from_sublayer, predictive, representational)


def scaled_gradients(forward: Callable[[], tuple[torch.Tensor, list[torch.Tensor]]], scale: float | None
                     ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...], float | None]:
    """Run ``forward`` (it returns a loss ``(batch,)`` and the tensors to differentiate it by) and the
    gradients of the loss's sum times ``scale`` (None: unscaled). While a gradient overflows and
    ``scale > 1``, halve the scale and run again (as a GradScaler does). Returns the tensors, their
    gradients (still multiplied by the scale) and the scale they were taken at (the next micro-batch's
    starting scale)."""
    while True:
        loss, inputs = forward()
        grads = torch.autograd.grad(loss.sum() if scale is None else loss.sum() * scale, inputs)
        if scale is None or scale <= 1 or bool(torch.stack([grad.isfinite().all() for grad in grads]).all()):
            return inputs, grads, scale
        scale /= 2


def _masked_square_sum(act: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``Σ_{real tokens} act²`` per column ``(width,)`` float64, of ``act`` ``(batch, seq, width)``
    and ``real`` ``(1, batch * seq)`` bool, True on real tokens.

    One square and one matrix-vector product in ``act``'s precision (float32: a micro-batch's
    sum of a few thousand positive terms, relative error ~1e-6), added up over micro-batches in
    float64; indexing the real tokens out and squaring them in float64 took five times as long.
    """
    return (real.to(act.dtype) @ act.square().flatten(0, 1)).squeeze(0).double()


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


def score(knowledge: Knowledge, masks: Masks, cost: CostModel, lambda_pred: float, lambda_rep: float,
          mu: float) -> dict[int, torch.Tensor]:
    """Per-FLOP importance of every unit, by sub-layer; units already pruned score ``-inf``.

    Heads: ``μ·(λ_rep·K_rep + λ_pred·K_pred)/F_head``; neurons: ``(λ_rep·K_rep + λ_pred·K_pred)/F_neuron``.
    With a latency cost, ``F_head`` / ``F_neuron`` are a full sub-layer's milliseconds per unit.
    """
    scores = {}
    for s, predictive in knowledge.predictive.items():
        kind = sublayer_kind(s)
        weight = (mu if kind == "mha" else 1.0) / cost.cost(kind)
        value = weight * (lambda_rep * knowledge.representational[s] + lambda_pred * predictive)
        alive = masks.of(kind)[s // 2].to(value.device) != 0
        scores[s] = torch.where(alive, value, torch.full_like(value, float("-inf")))
    return scores
