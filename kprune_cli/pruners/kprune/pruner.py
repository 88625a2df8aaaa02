"""K-prune's schedule over its three stages (DESIGN.md §2-3).

Iterative (the paper): for each sub-layer ``s`` = MHA_0, FFN_0, ..., FFN_{L-1}:
measure the knowledge of every unit of the sub-layers ``≥ s`` on the current model, search
masks for all of them within the remaining FLOPs budget, apply only sub-layer ``s``'s mask,
tune ``s``, and subtract ``s``'s kept FLOPs from the budget.

One-shot (ablation): measure once, search once for all sub-layers, then tune sub-layer by
sub-layer bottom-up. Note that the student equals the teacher at that single measurement, so
the distillation gradient, hence predictive knowledge, is zero there: the one-shot search
ranks units by representational knowledge only (as would the official code's first step).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

from rich.progress import Progress

from kprune_cli.errors import UserError
from kprune_cli.models.masks import Masks
from kprune_cli.pruners.base import PruneProblem, PruneResult
from kprune_cli.pruners.common import sublayer_kind, timed
from kprune_cli.pruners.common.teacher import Teacher
from kprune_cli.pruners.kprune.measure import measure, score
from kprune_cli.pruners.kprune.search import kpms
from kprune_cli.pruners.kprune.tune import kpwt

StepCallback = Callable[[int, Masks], None]


class KPrunePruner:
    """K-prune (Park, Choi, Kang; ICLR 2024): retraining-free structured pruning that preserves knowledge.

    ``lambda_pred`` / ``lambda_rep`` weigh predictive / representational knowledge, ``mu``
    up-weights heads, ``temperature`` softens the distillation targets; ``tune`` enables KPWT,
    ``iterative`` selects the sub-layer-wise schedule (else one-shot); ``batch_size`` caps the
    sequences per forward/backward pass (memory only).
    """

    name = "kprune"

    def __init__(self, lambda_pred: float = 1.0, lambda_rep: float = 2.5e-4, mu: float = 64.0,
                 temperature: float = 2.0, tune: bool = True, iterative: bool = True,
                 batch_size: int | None = 32) -> None:
        for key, value in (("lambda_pred", lambda_pred), ("lambda_rep", lambda_rep)):
            if value < 0:
                raise UserError(f"pruner.{key}={value}: must be >= 0")
        if lambda_pred == 0 and lambda_rep == 0:
            raise UserError("pruner.lambda_pred=0 and pruner.lambda_rep=0: at least one must be > 0")
        for key, value in (("mu", mu), ("temperature", temperature)):
            if value <= 0:
                raise UserError(f"pruner.{key}={value}: must be > 0")
        if batch_size is not None and batch_size < 1:
            raise UserError(f"pruner.batch_size={batch_size}: must be a positive integer or null")
        self.lambda_pred = lambda_pred
        self.lambda_rep = lambda_rep
        self.mu = mu
        self.temperature = temperature
        self.tune = tune
        self.iterative = iterative
        self.batch_size = batch_size

    def prune(self, problem: PruneProblem, progress: Progress | None = None,
              on_step: StepCallback | None = None) -> PruneResult:
        """Find keep-masks within ``problem.budget`` (tuning output projections in place when ``tune``).

        ``progress``: a running rich progress to add a task to (else a transient one is shown);
        ``on_step(s, masks)``: called after sub-layer ``s`` has been pruned (and tuned).
        """
        timing = {"teacher": 0.0, "measure": 0.0, "search": 0.0, "tune": 0.0}
        with timed(timing, "teacher"):
            teacher = Teacher(problem.model, problem.task.kind, problem.sample, self.temperature,
                              self.batch_size, problem.device, keep_model=self.tune)
        masks = Masks.ones(problem.adapter, problem.device)
        notes: list[str] = []
        num_sublayers = 2 * problem.adapter.num_layers
        owned = progress is None
        progress = Progress(transient=True) if owned else progress
        with progress if owned else nullcontext():
            bar = progress.add_task("K-prune", total=num_sublayers)
            if not self.iterative:
                self._search(problem, teacher, masks, 0, problem.budget, timing)
            budget = problem.budget
            for s in range(num_sublayers):
                kind = sublayer_kind(s)
                progress.update(bar, description=f"K-prune {kind.upper()} {s // 2}")
                if self.iterative:
                    self._search(problem, teacher, masks, s, budget, timing)
                    budget -= float(masks.of(kind)[s // 2].count_nonzero()) * problem.flops.cost(kind)
                if self.tune:
                    with timed(timing, "teacher"):
                        teacher_sums = teacher.residual_sums(s)
                    with timed(timing, "tune"):
                        notes += kpwt(problem.model, problem.adapter, masks, teacher.batches, teacher_sums, s)
                if on_step is not None:
                    on_step(s, masks)
                progress.advance(bar)
        return PruneResult(masks=masks, notes=notes, timing=timing)

    def _search(self, problem: PruneProblem, teacher: Teacher, masks: Masks, from_sublayer: int,
                budget: float, timing: dict[str, float]) -> None:
        """Measure sub-layers ``≥ from_sublayer``, search, and write the masks of the sub-layers it decides:
        only ``from_sublayer`` when iterative, all of them when one-shot."""
        with timed(timing, "measure"):
            knowledge = measure(problem.model, problem.adapter, masks, teacher, from_sublayer)
        with timed(timing, "search"):
            scores = score(knowledge, masks, problem.flops, self.lambda_pred, self.lambda_rep, self.mu)
            keep = kpms(scores, problem.flops, budget)
        decided = [from_sublayer] if self.iterative else list(keep)
        for s in decided:
            masks.of(sublayer_kind(s))[s // 2] = keep[s].to(masks.heads[0].dtype)

