"""Kwon et al.'s one-shot schedule (docs/design.md §3): measure once, search once, rearrange, tune bottom-up.

1. Fisher: per-batch gradients of the labelled task loss w.r.t. every unit mask, at full masks;
2. search: the split between heads and neurons that keeps the most diagonal-Fisher importance
   within the FLOPs budget;
3. rearrange (optional): per sub-layer, swap which units are kept to lower the block-diagonal
   Fisher estimate of the loss increase, keeping the per-sub-layer counts;
4. tune (optional): per sub-layer bottom-up, real-valued masks of the survivors by least squares.

No weight of the model changes: the result is the masks, whose real values the pipeline folds into
the output projections when slicing.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Mapping

import torch
from rich.progress import Progress

from kprune_cli.models.masks import Masks
from kprune_cli.pruners.base import PruneProblem, PruneResult
from kprune_cli.pruners.common import keep_masks
from kprune_cli.pruners.common.gradient_batch import official_gradient_batch
from kprune_cli.pruners.common.reconstruction import (
    TokenBatch,
    check_gram_precision,
    gram_precision_notes,
    resolve_gram_precision,
)
from kprune_cli.pruners.kwon.fisher import fisher_importance, labelled_batches, mask_gradients, split_batch
from kprune_cli.pruners.kwon.rearrange import rearrange_units
from kprune_cli.pruners.kwon.search import search_latency_masks, search_masks
from kprune_cli.pruners.kwon.tune import LayerwiseTuning, teacher_budget
from kprune_cli.runtime.console import make_progress, track
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.precision import full_float32
from kprune_cli.runtime.timing import timed
from kprune_cli.tasks.data import TARGET_KEYS

TEACHERS = ("intermediate", "original")


class KwonPruner:
    """Kwon et al. (NeurIPS 2022): Fisher-based mask search, rearrangement and mask tuning, without retraining.

    ``gradient_batch``: sequences per gradient batch; the Fisher sums squared *per-batch* gradients,
    so this is part of the method, not a memory knob (``None``: the official code's for the
    task, 32 for GLUE and 12 for SQuAD, see
    :func:`~kprune_cli.pruners.common.gradient_batch.official_gradient_batch`).
    ``micro_batch_size``: sequences per forward/backward pass (memory only: a gradient batch's
    ``∂loss/∂m`` is accumulated over its micro-batches; ``None``: one pass per gradient batch).
    ``rearrange`` / ``tune`` enable steps 3 / 4. ``teacher``: what mask tuning reconstructs,
    ``"intermediate"`` (official: the model pruned to the milder budget ``sqrt`` of the kept
    fraction; under ``constraint=latency`` still the FLOPs search's at the rate, a deviation: ours
    keeps the teacher independent of the timer's noise) or ``"original"`` (the unpruned model).
    With a latency table (``problem.latency``) the search is their latency search
    (:func:`~kprune_cli.pruners.kwon.search.search_latency_masks`). ``gram_precision``: mask tuning's
    per-micro-batch products, ``"float64"``, ``"float32"`` (summed in float64) or ``"auto"`` (float32
    only on a GPU with slow float64).
    """

    name = "kwon"
    needs_labels = True  # the Fisher information of the task loss

    def __init__(self, gradient_batch: int | None = None, micro_batch_size: int | None = None, rearrange: bool = True,
                 tune: bool = True, teacher: str = "intermediate", gram_precision: str = "auto") -> None:
        for key, value in (("gradient_batch", gradient_batch), ("micro_batch_size", micro_batch_size)):
            if value is not None and value < 1:
                raise UserError(f"pruner.{key}={value}: must be a positive integer or null")
        if teacher not in TEACHERS:
            raise UserError(f"pruner.teacher={teacher!r}: choose one of {', '.join(TEACHERS)}")
        self.gradient_batch = gradient_batch
        self.micro_batch_size = micro_batch_size
        self.rearrange = rearrange
        self.tune = tune
        self.teacher = teacher
        self.gram_precision = check_gram_precision(gram_precision)

    @full_float32()
    def prune(self, problem: PruneProblem, progress: Progress | None = None) -> PruneResult:
        """Find masks within ``problem.budget``; ``progress``: a running rich progress to add tasks to
        (else a transient one is shown). float32 products run in full float32 (no TF32)."""
        model, adapter = problem.model, problem.adapter
        num_sublayers = 2 * adapter.num_layers
        timing = {"fisher": 0.0, "search": 0.0, "rearrange": 0.0, "tune": 0.0}
        gradient_batch = self.gradient_batch_of(problem)
        batches = labelled_batches(problem.sample, gradient_batch, problem.device)
        notes: list[str] = []
        owned = progress is None
        progress = make_progress() if owned else progress
        with progress if owned else nullcontext():
            with timed(timing, "fisher"):
                bar = progress.add_task("Kwon et al.: Fisher", total=len(batches))
                grads = mask_gradients(model, adapter, track(progress, batches, bar), self.micro_batch_size)
                importance = fisher_importance(grads)
            with timed(timing, "search"):
                keep = self._search(problem, importance)
            if self.rearrange:
                with timed(timing, "rearrange"):
                    bar = progress.add_task("Kwon et al.: rearrange", total=num_sublayers)
                    for s in track(progress, range(num_sublayers), bar):
                        keep[s] = rearrange_units(keep[s], grads[s])
            masks = keep_masks(adapter, keep, problem.device)
            if self.tune:
                with timed(timing, "search"):
                    reference = self._reference(problem, importance)
                with timed(timing, "tune"):
                    token_batches = [
                        TokenBatch({k: v for k, v in part.items() if k not in TARGET_KEYS},
                                   part["attention_mask"].bool())
                        for batch in batches for part in split_batch(batch, self.micro_batch_size)
                    ]
                    precision = resolve_gram_precision(self.gram_precision, problem.device)
                    notes += gram_precision_notes(self.gram_precision, precision)
                    tuning = LayerwiseTuning(model, adapter, masks, reference, token_batches, problem.task.kind,
                                             precision)
                    bar = progress.add_task("Kwon et al.: mask tuning", total=adapter.num_layers)
                    for layer in track(progress, range(adapter.num_layers), bar):
                        notes += tuning.tune_layer(layer)
        return PruneResult(masks=masks, notes=notes, timing=timing, settings={"gradient_batch": gradient_batch})

    def gradient_batch_of(self, problem: PruneProblem) -> int:
        """Sequences per gradient batch on ``problem``: ``gradient_batch``, else the task's official size."""
        return self.gradient_batch or official_gradient_batch(problem.task, problem.adapter.hidden_size)

    def micro_batch_of(self, problem: PruneProblem) -> int:
        """Sequences per pass on ``problem``: ``micro_batch_size`` (at most the gradient batch), else the
        gradient batch."""
        return min(self.micro_batch_size or self.gradient_batch_of(problem), self.gradient_batch_of(problem))

    @staticmethod
    def _search(problem: PruneProblem, importance: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Keep-masks within ``problem.budget``: the FLOPs search, or with a latency table their latency
        search on its per-width costs (:func:`~kprune_cli.pruners.kwon.search.search_latency_masks`)."""
        if problem.latency is None:
            return search_masks(importance, problem.flops, problem.budget)
        return search_latency_masks(importance, problem.latency.by_width("mha"), problem.latency.by_width("ffn"),
                                    problem.budget)

    def _reference(self, problem: PruneProblem, importance: Mapping[int, torch.Tensor]) -> Masks:
        """The masks of the model that mask tuning reconstructs (see the class docstring)."""
        if self.teacher == "original":
            return Masks.ones(problem.adapter, problem.device)
        structure = problem.adapter.structure()
        budget = problem.flops.budget(problem.rate, structure)  # FLOPs also under constraint=latency
        keep = search_masks(importance, problem.flops, teacher_budget(budget, problem.flops.total(structure)))
        return keep_masks(problem.adapter, keep, problem.device)
