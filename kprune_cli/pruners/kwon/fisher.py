"""Fisher importance of every unit mask (Kwon et al., step a).

The model runs with an all-ones mask on every head's and neuron's output (docs/design.md §3) and with
the sample's gold targets, so it returns its own task loss ``outputs.loss`` (a batch mean:
cross-entropy for classification, squared error for regression, the mean of the start- and
end-position cross-entropies for QA). For every gradient batch ``b`` (``pruner.gradient_batch``
sequences in the sample's random draw order, like the official code's batches) the gradient
``g_b = ∂loss_b / ∂m`` is taken w.r.t. all masks at once, and a unit's importance is the diagonal of
the empirical Fisher information, ``I_i = Σ_b g_{b,i}²``: per-*batch* gradients of the batch-mean
loss, squared and summed, exactly as the official code does. The per-batch gradients are kept:
mask rearrangement builds the block-diagonal Fisher from them.

Sample size: the official code draws 2,048 training examples (with replacement) in batches of 32
(12 for SQuAD). The pipeline passes the calibration sample; this pruner's config draws 2,048
examples (``configs/pruner_calibration/kwon.yaml``) and leaves ``pruner.gradient_batch`` to the task's
official size (:func:`~kprune_cli.pruners.common.gradient_batch.official_gradient_batch`): both the
batching and the sample size change the Fisher values. ``pruner.micro_batch_size`` does not: a
gradient batch too large for the memory is run in micro-batches, and its gradient is the sum of
theirs, each micro-batch's mean loss weighted by its share of the batch (the batch-mean loss is
the sum of those terms).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from transformers import PreTrainedModel

from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.pruners.common.hooks import frozen
from kprune_cli.pruners.common.teacher import drop_padding_columns, micro_batches
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


def split_batch(batch: dict[str, torch.Tensor], micro_batch_size: int | None) -> list[dict[str, torch.Tensor]]:
    """``batch`` in micro-batches of at most ``micro_batch_size`` sequences, each without its all-padding
    columns (``batch`` itself when it fits, or for ``None``)."""
    size = int(batch["input_ids"].shape[0])
    if micro_batch_size is None or micro_batch_size >= size:
        return [batch]
    return [drop_padding_columns({key: value[start:start + micro_batch_size] for key, value in batch.items()})
            for start in range(0, size, micro_batch_size)]


def batch_gradients(model: PreTrainedModel, adapter: ModelAdapter, batch: dict[str, torch.Tensor],
                    micro_batch_size: int | None = None) -> list[torch.Tensor]:
    """``∂loss/∂m`` of one labelled gradient batch at all-ones masks, per sub-layer: ``(units_s,)``;
    with ``micro_batch_size``, summed over micro-batches of that many sequences (see the module doc)."""
    masks = Masks.ones(adapter, batch["input_ids"].device)
    tensors = [mask.requires_grad_(True) for mask in sublayer_masks(masks)]
    parts = split_batch(batch, micro_batch_size)
    total: list[torch.Tensor] | None = None
    for part in parts:
        with tolerant_determinism():  # the CUDA NLL loss has no deterministic kernel
            with frozen(model), apply_masks(adapter, masks):
                loss = model(**part).loss
            if loss is None:
                raise UserError(f"the {model.__class__.__name__} returned no loss for the gold targets "
                                f"{sorted(key for key in part if key in TARGET_KEYS)}: pruner=kwon needs a task loss")
            if len(parts) > 1:
                loss = loss * (part["input_ids"].shape[0] / batch["input_ids"].shape[0])
            grads = [grad.detach() for grad in torch.autograd.grad(loss, tensors, materialize_grads=True)]
        total = grads if total is None else [sum_ + grad for sum_, grad in zip(total, grads)]
    return total


def mask_gradients(model: PreTrainedModel, adapter: ModelAdapter, batches: Iterable[dict[str, torch.Tensor]],
                   micro_batch_size: int | None = None) -> dict[int, torch.Tensor]:
    """Per-batch mask gradients by sub-layer: ``grads[s]`` ``(batches, units_s)`` (``micro_batch_size``:
    see :func:`batch_gradients`)."""
    per_batch = [batch_gradients(model, adapter, batch, micro_batch_size) for batch in batches]
    return {s: torch.stack(grads) for s, grads in enumerate(zip(*per_batch))}


def fisher_importance(grads: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Diagonal Fisher information by sub-layer: ``Σ_b g_b²`` ``(units_s,)``, float64."""
    return {s: grad.double().pow(2).sum(dim=0) for s, grad in grads.items()}
