"""Fisher importance of every unit mask (Kwon et al., step a).

The model runs with an all-ones mask on every head's and neuron's output (docs/design.md §3) and with
the sample's gold targets, so it returns its own task loss ``outputs.loss`` (a batch mean:
cross-entropy for classification, squared error for regression, the mean of the start- and
end-position cross-entropies for QA). For every gradient batch ``b`` (``pruner.batch_size``
sequences in the sample's random draw order, like the official code's batches) the gradient
``g_b = ∂loss_b / ∂m`` is taken w.r.t. all masks at once, and a unit's importance is the diagonal of
the empirical Fisher information, ``I_i = Σ_b g_{b,i}²``: per-*batch* gradients of the batch-mean
loss, squared and summed, exactly as the official code does. The per-batch gradients are kept:
mask rearrangement builds the block-diagonal Fisher from them.

Sample size: the official code draws 2,048 training examples (with replacement) in batches of 32
(12 for SQuAD). The pipeline passes the calibration sample; this pruner's config draws 2,048
examples (``configs/pruner_calibration/kwon.yaml``) and leaves ``pruner.batch_size`` to the task's
official size (:func:`~kprune_cli.pruners.common.gradient_batch.official_gradient_batch`): both the
batching and the sample size change the Fisher values.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from transformers import PreTrainedModel

from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.pruners.common.hooks import frozen
from kprune_cli.pruners.common.teacher import micro_batches
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.precision import tolerant_determinism
from kprune_cli.tasks.calibration import CalibrationSample
from kprune_cli.tasks.data import TARGET_KEYS


def labelled_batches(sample: CalibrationSample, batch_size: int | None,
                     device: torch.device | str) -> list[dict[str, torch.Tensor]]:
    """The sample as device gradient batches of model inputs ``(batch, seq)`` plus gold targets
    ``(batch,)``: ``batch_size`` sequences each in draw order, a random order as in the official
    code (``None``: the calibration batches as they are, sorted by length).

    Raises a :class:`UserError` when the sample carries no gold targets.
    """
    ordered = sample.in_draw_order(batch_size) if batch_size is not None else sample
    batches = micro_batches(ordered, None, device, with_targets=True)
    if not batches or not any(key in batches[0] for key in TARGET_KEYS):
        raise UserError("pruner=kwon needs gold targets in the calibration sample "
                        f"({' or '.join(TARGET_KEYS)}); this sample has none")
    return batches


def sublayer_masks(masks: Masks) -> list[torch.Tensor]:
    """The mask tensors in sub-layer order: MHA_0, FFN_0, MHA_1, ..., FFN_{L-1}."""
    return [mask for pair in zip(masks.heads, masks.neurons) for mask in pair]


def batch_gradients(model: PreTrainedModel, adapter: ModelAdapter,
                    batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """``∂loss/∂m`` of one labelled micro-batch at all-ones masks, per sub-layer: ``(units_s,)``."""
    masks = Masks.ones(adapter, batch["input_ids"].device)
    tensors = [mask.requires_grad_(True) for mask in sublayer_masks(masks)]
    with tolerant_determinism():  # the CUDA NLL loss has no deterministic kernel
        with frozen(model), apply_masks(adapter, masks):
            loss = model(**batch).loss
        if loss is None:
            raise UserError(f"the {model.__class__.__name__} returned no loss for the gold targets "
                            f"{sorted(key for key in batch if key in TARGET_KEYS)}: pruner=kwon needs a task loss")
        return [grad.detach() for grad in torch.autograd.grad(loss, tensors, materialize_grads=True)]


def mask_gradients(model: PreTrainedModel, adapter: ModelAdapter,
                   batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Per-batch mask gradients by sub-layer: ``grads[s]`` ``(batches, units_s)``."""
    per_batch = [batch_gradients(model, adapter, batch) for batch in batches]
    return {s: torch.stack(grads) for s, grads in enumerate(zip(*per_batch))}


def fisher_importance(grads: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Diagonal Fisher information by sub-layer: ``Σ_b g_b²`` ``(units_s,)``, float64."""
    return {s: grad.double().pow(2).sum(dim=0) for s, grad in grads.items()}
