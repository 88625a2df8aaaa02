"""K-prune's schedule over its three stages (docs/design.md §3).

Iterative (the paper): for each sub-layer ``s`` = MHA_0, FFN_0, ..., FFN_{L-1}:
measure the knowledge of every unit of the sub-layers ``≥ s`` on the current model, search
masks for all of them within the remaining FLOPs budget, apply only sub-layer ``s``'s mask,
tune ``s``, and subtract ``s``'s kept FLOPs from the budget.

Every pass starts at the target layer: the student's hidden states entering layer ``l`` are
kept for the whole sample (they do not change once the sub-layers below are final), fed to
layer ``l`` by :class:`~kprune_cli.pruners.common.window.LayerWindow`, and moved up one layer
after FFN_l is tuned. The teacher's pre-LN sums are walked up the same way, from the model itself
before each layer is tuned (no copy of the model). KPWT's normal equations come from a pass
over layer ``l`` alone after the search: accumulating the full-width ``AᵀA`` in float64 during
the measurement pass instead would cost more than that pass for an FFN (1536² or 3072² per
token). Results are those of running every pass from the embeddings (the reference schedule in
:mod:`benchmarks.reference`), bit for bit. The measurement passes (forward and backward
through layers ``≥ l``) are then nearly all of the cost.

One-shot (ablation): measure once, search once for all sub-layers, then tune sub-layer by
sub-layer bottom-up. Note that the student equals the teacher at that single measurement, so
the distillation gradient, hence predictive knowledge, is zero there: the one-shot search
ranks units by representational knowledge only (as would the official code's first step).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Mapping

import torch
from rich.progress import Progress

from kprune_cli.models.masks import Masks
from kprune_cli.models.precision import AUTOCAST_DTYPES, autocast_forward
from kprune_cli.pruners.base import PruneProblem, PruneResult
from kprune_cli.pruners.common import sublayer_kind, sublayer_parts
from kprune_cli.pruners.common.gradient_batch import official_gradient_batch
from kprune_cli.pruners.common.kpms import align_kept, kpms
from kprune_cli.pruners.common.norm_refit import (KEEP, NORM_REFITS, NormFit, norm_layer, norm_refit_notes, refit_norm,
                                                  write_norm)
from kprune_cli.pruners.common.reconstruction import check_gram_precision, gram_precision_notes, resolve_gram_precision
from kprune_cli.pruners.common.teacher import ResidualSums, Teacher
from kprune_cli.pruners.common.window import advance, encoder_inputs
from kprune_cli.pruners.kprune.measure import measure, score
from kprune_cli.pruners.kprune.select import select_and_tune
from kprune_cli.pruners.kprune.tune import KPWT_RIDGE, kpwt
from kprune_cli.runtime.console import make_progress
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.hardware import emulated_note
from kprune_cli.runtime.precision import full_float32
from kprune_cli.runtime.timing import timed

StepCallback = Callable[[int, Masks], None]

AUTOCAST_SCOPES = ("measure", "all")
"""Values of ``pruner.autocast_scope``: which passes run in ``pruner.autocast``'s precision. ``measure``:
the measurement passes (forward and backward); ``all``: also the teacher's pass (soft targets and
residual sums), KPWT's passes and the passes that move the cached hidden states up a layer."""

GPU_MICRO_BATCH_TOKENS = 16384
"""Tokens per pass of ``pruner.micro_batch_tokens=auto`` on a CUDA GPU (the CUDA review's S3: 16-32K
tokens keep a GPU busy where 32 GLUE sequences, about 2K tokens, leave it launch-bound; not yet timed
on a GPU). On a CPU ``auto`` keeps ``micro_batch_size``."""

SELECTIONS = ("score", "reconstruction")
"""Values of ``pruner.selection``: which units of a sub-layer survive (KPMS decides how many)."""


def check_ridge(value: float | str, selection: str, affine_tuning: bool) -> float | str:
    """``pruner.ridge`` as given if valid: a relative ridge > 0, or ``"auto"`` with plain KPWT; else a
    :class:`UserError`."""
    if value == "auto":
        if selection != "score" or affine_tuning:
            raise UserError("pruner.ridge=auto works with plain KPWT only: set pruner.selection=score and "
                            "pruner.affine_tuning=false, or give a number")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"pruner.ridge={value}: give a relative ridge > 0 (default {KPWT_RIDGE:g}) or auto")
    return float(value)


def held_out_notes(held_out: Mapping[str, Mapping[str, float | None]], ridge: float | str,
                   tokens: int, micro_batches: int) -> list[str]:
    """The report's notes on KPWT's held-out check: ``held_out`` maps each checked sub-layer to the
    ridge it was solved with and its held-out error over the untuned one (``ratio``); the check
    needs ``micro_batches`` ≥ 2 (its halves are interleaved micro-batches)."""
    if micro_batches < 2 and ridge == "auto":
        return [f"pruner.ridge=auto: the sample came in one micro-batch, so there were no halves to choose on: "
                f"KPWT used the default ridge {KPWT_RIDGE:g} (a smaller pruner.micro_batch_size splits it)"]
    if not held_out:
        return []
    name = {str(s): f"{sublayer_kind(s).upper()} {s // 2}" for s in map(int, held_out)}
    if ridge == "auto":
        untuned = [name[key] for key, value in held_out.items() if value["ridge"] == math.inf]
        chosen = sorted({float(value["ridge"]) for value in held_out.values() if value["ridge"] != math.inf})
        return [f"pruner.ridge=auto: {len(held_out) - len(untuned)} of {len(held_out)} sub-layers tuned "
                f"(relative ridges {', '.join(f'{value:g}' for value in chosen) or 'none'})"
                + (f"; left untuned, as no ridge helped held-out tokens: {', '.join(untuned)}" if untuned else "")]
    worse = {key: float(value["ratio"]) for key, value in held_out.items() if float(value["ratio"]) > 1.0}
    if not worse:
        return []
    worst = max(worse, key=worse.get)
    return [f"KPWT overfitted the sample on {len(worse)} of {len(held_out)} sub-layers: fitted on half of the "
            f"{tokens:,} tokens, it raised the other half's reconstruction error (worst {name[worst]}, "
            f"{worse[worst]:.2f}x the untuned error); pruner.ridge=auto chooses the ridge on held-out tokens "
            f"instead (docs/method.md)"]


class KPrunePruner:
    """K-prune (Park, Choi, Kang; ICLR 2024): retraining-free structured pruning that preserves knowledge.

    ``lambda_pred`` / ``lambda_rep`` weigh predictive / representational knowledge, ``mu``
    up-weights heads, ``temperature`` softens the distillation targets; ``tune`` enables KPWT,
    ``iterative`` selects the sub-layer-wise schedule (else one-shot); ``micro_batch_size``: the
    sequences per forward/backward pass (memory only: it splits or merges the calibration batches,
    and changes results only in the last float bits; ``None``: the calibration batches as they
    are); ``autocast`` (``"bf16"`` or ``"fp16"``,
    default off) runs the measurement passes in that precision (faster on GPUs, slightly
    different scores; see :func:`~kprune_cli.pruners.kprune.measure.measure`), and with
    ``autocast_scope="all"`` (opt-in) the teacher's, KPWT's and the hidden-state passes too, their
    forward only (:func:`~kprune_cli.models.precision.autocast_forward`: the normal
    equations and solves stay float64);
    ``gradient_batch`` is the number of sequences per squared gradient of predictive knowledge
    (``None``: the official code's for the task, 32 for GLUE and 12 for SQuAD, to which ``lambda_rep``
    is tuned, see :func:`~kprune_cli.pruners.common.gradient_batch.official_gradient_batch`;
    1 = per-sample, see :mod:`~kprune_cli.pruners.kprune.measure`); ``gram_precision``: KPWT's
    per-micro-batch products, ``"float64"``, ``"float32"`` (summed in float64) or ``"auto"`` (float32
    only on a GPU with slow float64, see
    :func:`~kprune_cli.pruners.common.reconstruction.resolve_gram_precision`); ``align`` (default
    off): round each FFN's kept neurons down to a multiple of it (e.g. 8 or 64, for tensor-core
    GEMMs), dropping its lowest-scoring survivors; in the iterative schedule the FLOPs freed go to
    the later sub-layers.
    Opt-in, off by default (docs/kprune-plus.md): ``selection="reconstruction"`` picks a sub-layer's
    survivors among its lower-scored units by the reconstruction error left after the re-fit
    (:mod:`~kprune_cli.pruners.kprune.select`; needs ``tune`` and ``iterative``); ``affine_tuning``
    re-fits the output bias with the weights (:mod:`~kprune_cli.pruners.kprune.tune`); ``norm_refit``
    (``"least_squares"`` or ``"moments"``) re-fits, channel by channel, the gain and bias of the LayerNorm
    that reads each tuned sub-layer's sum towards the teacher's output of it
    (:mod:`~kprune_cli.pruners.common.norm_refit`; needs ``tune``).
    ``ridge``: KPWT's relative ridge (the default is a numerical guard, nearly the official code's
    plain least squares), or ``"auto"`` (opt-in): chosen per sub-layer by the error on held-out halves
    of the sample, for samples small next to the widths kept (docs/method.md). Every plain-KPWT run
    checks its fits on held-out halves and notes the sub-layers where tuning made unseen tokens worse.

    Resumable (:class:`~kprune_cli.pruners.base.Resumable`): after each finished sub-layer its
    state is ``{"done", "budget", "notes", "timing", "micro_batch_size", "masks": {"heads":
    {layer: (H,)}, "neurons": {layer: (N,)}}, "tuned": {sub-layer: {"weight": (d, width), "bias": (d,)}},
    "selection", "affine_tuning", "ridge", "norm_refit", "held_out": {sub-layer: {"ridge", "ratio"}},
    "norms": {sub-layer: {"weight": (d,), "bias": (d,), "shrink", "held_out"}}}``
    (``tuned``: the output projections of the finished sub-layers, the weights it changes besides
    ``norms``, the LayerNorms re-fitted after them with ``norm_refit``; empty without ``tune``;
    the four switches: a resume must use the same; ``held_out``: the held-out check of each tuned
    sub-layer, see :func:`held_out_notes`).
    """

    name = "kprune"
    needs_labels = False  # the original model's own predictions stand for labels

    def __init__(self, lambda_pred: float = 1.0, lambda_rep: float = 2.5e-4, mu: float = 64.0,
                 temperature: float = 2.0, tune: bool = True, iterative: bool = True,
                 micro_batch_size: int | None = 32, micro_batch_tokens: int | str | None = "auto",
                 autocast: bool | str | None = False,
                 autocast_scope: str = "measure", gradient_batch: int | None = None, gram_precision: str = "auto",
                 align: int | None = None,
                 selection: str = "score", affine_tuning: bool = False, ridge: float | str = KPWT_RIDGE,
                 norm_refit: str | bool = False) -> None:
        for key, value in (("lambda_pred", lambda_pred), ("lambda_rep", lambda_rep)):
            if value < 0:
                raise UserError(f"pruner.{key}={value}: must be >= 0")
        if lambda_pred == 0 and lambda_rep == 0:
            raise UserError("pruner.lambda_pred=0 and pruner.lambda_rep=0: at least one must be > 0")
        for key, value in (("mu", mu), ("temperature", temperature)):
            if value <= 0:
                raise UserError(f"pruner.{key}={value}: must be > 0")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise UserError(f"pruner.micro_batch_size={micro_batch_size}: must be a positive integer or null")
        if micro_batch_tokens not in (None, "auto") and not (isinstance(micro_batch_tokens, int)
                                                               and micro_batch_tokens >= 1):
            raise UserError(f"pruner.micro_batch_tokens={micro_batch_tokens}: give a positive integer, auto or null")
        if gradient_batch is not None and gradient_batch < 1:
            raise UserError(f"pruner.gradient_batch={gradient_batch}: must be a positive integer or null")
        if align is not None and align < 1:
            raise UserError(f"pruner.align={align}: must be a positive integer or null")
        self.lambda_pred = lambda_pred
        self.lambda_rep = lambda_rep
        self.mu = mu
        self.temperature = temperature
        self.tune = tune
        self.iterative = iterative
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.gradient_batch = gradient_batch
        if autocast not in (False, None, *AUTOCAST_DTYPES):
            raise UserError(f"pruner.autocast={autocast}: choose false, {' or '.join(AUTOCAST_DTYPES)}")
        self.autocast = autocast or False
        if autocast_scope not in AUTOCAST_SCOPES:
            raise UserError(f"pruner.autocast_scope={autocast_scope}: choose {' or '.join(AUTOCAST_SCOPES)}")
        if autocast_scope == "all" and not self.autocast:
            raise UserError("pruner.autocast_scope=all needs pruner.autocast=bf16 or fp16 "
                            "(the precision of those passes)")
        self.autocast_scope = autocast_scope
        if selection not in SELECTIONS:
            raise UserError(f"pruner.selection={selection}: choose {' or '.join(SELECTIONS)}")
        if selection == "reconstruction" and not (tune and iterative):
            raise UserError("pruner.selection=reconstruction needs pruner.tune=true and pruner.iterative=true "
                            "(its cost is the error after the re-fit, chosen sub-layer by sub-layer)")
        if affine_tuning and not tune:
            raise UserError("pruner.affine_tuning=true needs pruner.tune=true (it is a variant of KPWT)")
        if norm_refit not in (False, None, *NORM_REFITS):
            raise UserError(f"pruner.norm_refit={norm_refit}: choose false, {' or '.join(NORM_REFITS)}")
        if norm_refit and not tune:
            raise UserError(f"pruner.norm_refit={norm_refit} needs pruner.tune=true (it fits the LayerNorm after each "
                            "tuned sub-layer, towards the teacher's sums that tuning takes)")
        self.selection = selection
        self.affine_tuning = bool(affine_tuning)
        self.ridge = check_ridge(ridge, selection, self.affine_tuning)
        self.norm_refit = norm_refit or False
        self.gram_precision = check_gram_precision(gram_precision)
        self.align = align
        self._state: dict[str, Any] = {"done": 0, "micro_batch_size": micro_batch_size}
        self._held_out: dict[str, dict[str, float | None]] = {}
        self._norms: dict[str, NormFit] = {}
        self._resume_from: Mapping[str, Any] | None = None
        self._resume_notes: list[str] = []

    def micro_batch_of(self, problem: PruneProblem) -> int:
        """Sequences per pass on ``problem``: ``micro_batch_size``, else its largest calibration batch."""
        return self.micro_batch_size or max(int(batch["input_ids"].shape[0]) for batch in problem.sample.batches)

    def state_dict(self) -> dict[str, Any]:
        """The state after the last finished sub-layer (see the class docstring); ``{"done": 0, ...}``
        before any."""
        return dict(self._state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` at the next :meth:`prune`, with the micro-batch size it was made with
        (an out-of-memory retry may have lowered it; a note says so)."""
        if int(state["done"]) == 0:
            self._resume_from = None
            return
        missing = [key for key in ("budget", "notes", "timing", "masks", "tuned") if key not in state]
        if missing:
            raise UserError(f"the saved K-prune state lacks {', '.join(missing)}: start again with overwrite=true")
        switches = {"selection": self.selection, "affine_tuning": self.affine_tuning, "ridge": self.ridge,
                    "norm_refit": self.norm_refit}
        changed = [f"pruner.{key}={state.get(key, default)}" for key, default in (("selection", "score"),
                   ("affine_tuning", False), ("ridge", KPWT_RIDGE), ("norm_refit", False))
                   if state.get(key, default) != switches[key]]
        if changed:
            raise UserError(f"the interrupted run used {', '.join(changed)}: resume with the same, "
                            f"or start again with overwrite=true")
        self._resume_from = state
        self._held_out = {key: dict(value) for key, value in state.get("held_out", {}).items()}
        self._norms = {key: NormFit(value["weight"], value.get("bias"), value["shrink"], value["held_out"])
                       for key, value in state.get("norms", {}).items()}
        saved = state.get("micro_batch_size", self.micro_batch_size)
        if saved != self.micro_batch_size:
            self._resume_notes = [f"resumed with pruner.micro_batch_size={saved}, as the interrupted run used it "
                                  f"(configured: {self.micro_batch_size})"]
            self.micro_batch_size = saved

    @full_float32()
    def prune(self, problem: PruneProblem, progress: Progress | None = None,
              on_step: StepCallback | None = None) -> PruneResult:
        """Find keep-masks within ``problem.budget`` (tuning output projections in place when ``tune``).

        ``progress``: a running rich progress to add a task to (else a transient one is shown);
        ``on_step(s, masks)``: called after sub-layer ``s`` has been pruned (and tuned).
        With ``problem.steps``, the progress is kept there after each sub-layer, and a run that
        finds some there continues after its last finished sub-layer, with the same result.
        float32 products run in full float32 (no TF32; autocast regions keep their precision).
        """
        if problem.steps is not None and (state := problem.steps.load()) is not None:
            self.load_state_dict(state)
        saved, self._resume_from = self._resume_from, None
        sizing = self._size_by_tokens(problem) if saved is None else []
        timing = {"teacher": 0.0, "measure": 0.0, "search": 0.0, "tune": 0.0}
        passes = self._forward_precision(problem)
        with timed(timing, "teacher"), passes():
            teacher = Teacher(problem.model, problem.task.kind, problem.sample, self.temperature,
                              self.micro_batch_size, problem.device, keep_model=False)
            # The teacher's pre-LN sums come from the model itself: layer l's are taken at step 2l,
            # before any weight of layer l is tuned, so no copy of the model is needed.
            teacher_sums = ResidualSums(problem.model, teacher.batches) if self.tune else None
        gradient_batch = self.gradient_batch_of(problem)
        gram_precision = resolve_gram_precision(self.gram_precision, problem.device)
        num_sublayers = 2 * problem.adapter.num_layers
        if saved is None:
            self._held_out, self._norms = {}, {}
            start, masks, budget = 0, Masks.ones(problem.adapter, problem.device), problem.budget
            notes = (sizing + self.precision_notes(problem.device)
                     + (gram_precision_notes(self.gram_precision, gram_precision) if self.tune else [])
                     + self._affine_notes(problem))
        else:
            start, budget, notes = int(saved["done"]), float(saved["budget"]), list(saved["notes"])
            layers = range(problem.adapter.num_layers)
            masks = Masks(*([saved["masks"][kind][str(layer)].to(problem.device) for layer in layers]
                            for kind in ("heads", "neurons")))
            for stage, seconds in saved["timing"].items():  # the interrupted runs' time, plus this one's
                timing[stage] = timing.get(stage, 0.0) + seconds
            with passes():
                self._resume(problem, teacher_sums, start, saved["tuned"], self._norms, notes)
        notes += self._resume_notes
        self._resume_notes = []
        inputs = [batch.inputs for batch in teacher.batches]
        with timed(timing, "measure"), passes():
            hidden = encoder_inputs(problem.model, problem.adapter, inputs)  # entering layer 0
            for layer in range(min(start, num_sublayers - 1) // 2):  # a resumed run: up to its next layer
                hidden = advance(problem.model, problem.adapter, masks, layer, inputs, hidden)
        owned = progress is None
        progress = make_progress() if owned else progress
        with progress if owned else nullcontext():
            bar = progress.add_task("K-prune", total=num_sublayers, completed=start)
            pending: tuple[int, NormFit] | None = None  # a pre-norm FFN's fit of the next layer's input norm
            if not self.iterative and saved is None:
                self._search(problem, teacher, masks, 0, problem.budget, timing, hidden, gradient_batch)
            for s in range(start, num_sublayers):
                kind, layer = sublayer_kind(s), s // 2
                progress.update(bar, description=f"K-prune {kind.upper()} {layer}")
                if pending is not None:  # the layer's teacher sums come from its norm as it was
                    with timed(timing, "teacher"), passes():
                        teacher_sums(s)
                    write_norm(problem.adapter, *pending)
                    pending = None
                if self.iterative:
                    scores, keep = self._search(problem, teacher, masks, s, budget, timing, hidden, gradient_batch)
                    budget -= problem.cost.kept_cost(kind, int(keep[s].count_nonzero()))
                if teacher_sums is not None:
                    with timed(timing, "teacher"), passes():
                        sums = teacher_sums(s)
                    with timed(timing, "tune"), passes():  # with selection=reconstruction, the selection's time too
                        if self.selection == "reconstruction":
                            notes += select_and_tune(problem.model, problem.adapter, masks, teacher.batches, sums,
                                                     s, scores[s], int(keep[s].count_nonzero()), hidden,
                                                     self.affine_tuning, precision=gram_precision)
                        else:
                            tuning = kpwt(problem.model, problem.adapter, masks, teacher.batches, sums, s, self.ridge,
                                          hidden, gram_precision, self.affine_tuning, check=True)
                            notes += tuning.notes
                            if tuning.held_out is not None:
                                self._held_out[str(s)] = {"ridge": tuning.ridge, "ratio": tuning.held_out}
                    if self.norm_refit:
                        with timed(timing, "tune"), passes():
                            fit = refit_norm(problem.model, problem.adapter, masks, teacher.batches, sums, s, hidden,
                                             self.norm_refit)
                        if fit is not None:
                            self._norms[str(s)] = fit
                            if norm_layer(problem.adapter, s) == layer:
                                write_norm(problem.adapter, s, fit)
                            else:
                                pending = (s, fit)
                if kind == "ffn" and s + 1 < num_sublayers:  # layer ``layer`` is final: move the cache up
                    with timed(timing, "measure"), passes():
                        hidden = advance(problem.model, problem.adapter, masks, layer, inputs, hidden)
                self._state = self._snapshot(problem, s + 1, masks, budget, notes, timing)
                if problem.steps is not None:
                    problem.steps.save(self._state, append_only=("tuned", "norms"))
                if on_step is not None:
                    on_step(s, masks)
                progress.advance(bar)
        if self.tune:
            notes += held_out_notes(self._held_out, self.ridge, problem.sample.num_tokens, len(teacher.batches))
        if self.norm_refit:
            notes += norm_refit_notes(self._norms, num_sublayers)
        settings: dict[str, Any] = {"gradient_batch": gradient_batch}
        if self._held_out:
            settings["kpwt_held_out"] = {
                key: {"ridge": "untuned" if value["ridge"] == math.inf else value["ridge"], "ratio": value["ratio"]}
                for key, value in sorted(self._held_out.items(), key=lambda item: int(item[0]))}
        if self._norms:
            settings["norm_refit"] = {key: {"shrink": "kept" if fit.shrink == KEEP else fit.shrink,
                                            "held_out": fit.held_out}
                                      for key, fit in sorted(self._norms.items(), key=lambda item: int(item[0]))}
        return PruneResult(masks=masks, notes=notes, timing=timing, settings=settings)

    def _forward_precision(self, problem: PruneProblem) -> Callable[[], ContextManager[None]]:
        """A context for the passes outside the measurement: the model's forward in ``autocast``'s
        precision when ``autocast_scope="all"``, else unchanged."""
        dtype = AUTOCAST_DTYPES[self.autocast] if self.autocast_scope == "all" else None
        return lambda: autocast_forward(problem.model, dtype)

    def token_budget(self, device: torch.device) -> int | None:
        """Tokens per pass that size the micro-batches on ``device``: ``micro_batch_tokens``, with
        ``"auto"`` = :data:`GPU_MICRO_BATCH_TOKENS` on CUDA and None (``micro_batch_size`` decides) elsewhere."""
        if self.micro_batch_tokens == "auto":
            return GPU_MICRO_BATCH_TOKENS if device.type == "cuda" else None
        return self.micro_batch_tokens

    def _size_by_tokens(self, problem: PruneProblem) -> list[str]:
        """With a token budget, set ``micro_batch_size`` to the sequences of the sample's longest
        length that fit it (at least 1), once: an out-of-memory retry then halves that, and a resumed
        run keeps the size it saved. Returns the report's note (none without a budget)."""
        budget = self.token_budget(problem.device)
        self.micro_batch_tokens = None
        if budget is None:
            return []
        longest = max(int(batch["input_ids"].shape[1]) for batch in problem.sample.batches)
        self.micro_batch_size = max(1, budget // longest)
        return [f"pruner.micro_batch_tokens={budget}: {self.micro_batch_size} sequences per pass (the sample's "
                f"sequences are up to {longest} tokens long); pruner.micro_batch_size was not used"]

    def gradient_batch_of(self, problem: PruneProblem) -> int:
        """Sequences per squared gradient on ``problem``: ``gradient_batch``, else the task's official size."""
        return self.gradient_batch or official_gradient_batch(problem.task, problem.adapter.hidden_size)

    def _snapshot(self, problem: PruneProblem, done: int, masks: Masks, budget: float, notes: list[str],
                  timing: dict[str, float]) -> dict[str, Any]:
        """The state after sub-layer ``done - 1`` (see the class docstring): masks copied, tuned weights
        by reference (a finished sub-layer's weights never change again)."""
        tuned: dict[str, dict[str, torch.Tensor]] = {}
        for sublayer in range(done if self.tune else 0):
            parts, kind = sublayer_parts(problem.adapter, sublayer)
            projection = parts.out_proj(kind)
            tuned[str(sublayer)] = {name: getattr(projection, name).detach() for name in ("weight", "bias")
                                    if getattr(projection, name) is not None}
        return {"done": done, "budget": budget, "notes": list(notes), "timing": dict(timing),
                "micro_batch_size": self.micro_batch_size,
                "selection": self.selection, "affine_tuning": self.affine_tuning, "ridge": self.ridge,
                "norm_refit": self.norm_refit,
                "held_out": {key: dict(value) for key, value in self._held_out.items()},
                "norms": {key: {"weight": fit.gain, "shrink": fit.shrink, "held_out": fit.held_out}
                          | ({"bias": fit.bias} if fit.bias is not None else {}) for key, fit in self._norms.items()},
                "masks": {"heads": {str(layer): mask.detach().clone() for layer, mask in enumerate(masks.heads)},
                          "neurons": {str(layer): mask.detach().clone() for layer, mask in enumerate(masks.neurons)}},
                "tuned": tuned}

    @staticmethod
    @torch.no_grad()
    def _resume(problem: PruneProblem, teacher_sums: ResidualSums | None, start: int,
                tuned: Mapping[str, Mapping[str, torch.Tensor]], norms: Mapping[str, NormFit],
                notes: list[str]) -> None:
        """Continue a killed run at sub-layer ``start``: the teacher's residual sums of that layer are
        taken from the still original model (as the uninterrupted run took them, before tuning it),
        then the tuned weights of the finished sub-layers (``tuned``, by sub-layer) and their re-fitted
        LayerNorms (``norms``) are loaded."""
        num_sublayers = 2 * problem.adapter.num_layers
        if teacher_sums is not None and start < num_sublayers:
            teacher_sums(start)
        for sublayer, weights in tuned.items():
            parts, kind = sublayer_parts(problem.adapter, int(sublayer))
            projection = parts.out_proj(kind)
            for name, tensor in weights.items():
                getattr(projection, name).copy_(tensor)
        for sublayer, fit in norms.items():
            write_norm(problem.adapter, int(sublayer), fit)
        where = f"{sublayer_kind(start).upper()} {start // 2}" if start < num_sublayers else "the end"
        notes.append(f"resumed at sub-layer {start} ({where}) from the step checkpoints of an interrupted run")

    def _affine_notes(self, problem: PruneProblem) -> list[str]:
        """A note when ``affine_tuning`` meets output projections without a bias (fitted plainly)."""
        projections = [parts.out_proj(kind) for parts in problem.adapter.layers() for kind in ("mha", "ffn")]
        if not self.affine_tuning or all(proj.bias is not None for proj in projections):
            return []
        return ["pruner.affine_tuning: the output projections without a bias (this family has none) "
                "were tuned plainly"]

    def precision_notes(self, device: torch.device) -> list[str]:
        """A note when ``autocast`` asks for a precision that ``device`` only emulates (slower than float32,
        up to 50x on a CPU without bf16 units); ``kprune run`` also prints it before the work starts."""
        passes = "measurement passes" if self.autocast_scope == "measure" else "measurement, teacher and KPWT passes"
        return emulated_note(f"pruner.autocast={self.autocast}", AUTOCAST_DTYPES.get(self.autocast), device,
                             f"the {passes}", "pruner.autocast=false")

    def _search(self, problem: PruneProblem, teacher: Teacher, masks: Masks, from_sublayer: int,
                budget: float, timing: dict[str, float], hidden: list[torch.Tensor],
                gradient_batch: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Measure sub-layers ``≥ from_sublayer`` (``hidden``: the student's hidden states entering
        their first layer; ``gradient_batch`` sequences per squared gradient), search, and write the
        masks of the sub-layers it decides: only ``from_sublayer`` when iterative, all of them when
        one-shot; with ``selection="reconstruction"`` none (:func:`select_and_tune` writes it).
        Returns the scores and KPMS's keep-masks ``(units,)`` by sub-layer."""
        with timed(timing, "measure"):
            knowledge = measure(problem.model, problem.adapter, masks, teacher, from_sublayer, hidden,
                                AUTOCAST_DTYPES.get(self.autocast), gradient_batch)
        with timed(timing, "search"):
            scores = score(knowledge, masks, problem.cost, self.lambda_pred, self.lambda_rep, self.mu)
            keep = kpms(scores, problem.cost, budget)
        decided = [from_sublayer] if self.iterative else list(keep)
        for s in decided:
            if self.align is not None and sublayer_kind(s) == "ffn":
                keep[s] = align_kept(keep[s], scores[s], self.align)
            if self.selection == "score":
                masks.of(sublayer_kind(s))[s // 2] = keep[s].to(masks.heads[0].dtype)
        return scores, keep

