"""Guards of a pruning run: no broken model is saved, and GPU memory shortage is retried or refused.

:func:`non_finite_tensors` finds NaN or infinite weights (checked before pruning, in the model
given, and after, in the pruned one); :func:`prune_with_memory_retry` checks up front that the
sample-sized caches fit the GPU, and restarts a pruner that ran out of GPU memory with half its
micro-batch (a memory knob only: the method's gradient batch never changes).
"""

from __future__ import annotations

import torch
from rich.markup import escape

from kprune_cli.pruners.base import MicroBatched, PruneProblem, Pruner, PruneResult
from kprune_cli.runtime.console import console
from kprune_cli.runtime.errors import UserError

CACHED_COPIES = 3
"""Sample-sized float32 tensors of ``(positions, d)`` a pruner may hold at once: the student's hidden
states entering the current layer, the teacher's residual sums of that layer and the hidden states
that walk them up (K-prune's teacher targets are small beside them)."""


class NonFiniteWeights(RuntimeError):
    """Pruning left NaN or infinite weights: the run fails and nothing is saved."""


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` holding NaN or ±inf."""
    return [name for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def cache_bytes(problem: PruneProblem) -> int:
    """Bytes of the sample-sized caches: ``3 · positions · d · 4`` with ``positions`` the sample's padded
    token positions (``Σ batch · seq`` over its calibration batches) and ``d`` the hidden size."""
    positions = sum(int(batch["input_ids"].numel()) for batch in problem.sample.batches)
    return CACHED_COPIES * positions * problem.adapter.hidden_size * 4


def check_cache_memory(problem: PruneProblem) -> None:
    """On a GPU, a :class:`UserError` naming ``calibration.num_tokens`` when the sample-sized caches
    (:func:`cache_bytes`) alone exceed the device's free memory (the model is already on it).
    No smaller micro-batch can help then; on other devices nothing is checked."""
    if problem.device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(problem.device)
    needed = cache_bytes(problem)
    if needed > free:
        tokens = problem.sample.num_tokens
        raise UserError(f"the calibration sample ({tokens} tokens) needs about {needed / 2**30:.1f} GiB of GPU memory "
                        f"for its cached hidden states and teacher sums, and {free / 2**30:.1f} GiB is free on "
                        f"{problem.device}: lower calibration.num_tokens (to about "
                        f"{int(tokens * free / needed)} here), or use a device with more memory")


def prune_with_memory_retry(pruner: Pruner, problem: PruneProblem, notes: list[str]) -> PruneResult:
    """``pruner.prune(problem)``; on a GPU, first :func:`check_cache_memory`, then, on an out-of-memory
    error, restore the weights and start again with ``pruner.micro_batch_size`` halved (pruners
    without one, :class:`~kprune_cli.pruners.base.MicroBatched`, are not retried).

    The weights are kept on the CPU meanwhile (a pruner may tune them in place), and the step
    checkpoints of the failed attempt are dropped. Each retry adds a line to ``notes``; with a
    micro-batch of 1 the error stands.
    """
    if problem.device.type != "cuda":
        return pruner.prune(problem)
    check_cache_memory(problem)
    if not isinstance(pruner, MicroBatched):
        return pruner.prune(problem)
    weights = {name: tensor.detach().to("cpu", copy=True) for name, tensor in problem.model.state_dict().items()}
    while True:
        try:
            return pruner.prune(problem)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError only exists from torch 2.5
            size = pruner.micro_batch_of(problem)
            if size <= 1:
                raise
        problem.model.load_state_dict(weights)
        if problem.steps is not None:
            problem.steps.discard()
        torch.cuda.empty_cache()
        pruner.micro_batch_size = size // 2
        notes.append(f"pruning ran out of GPU memory with pruner.micro_batch_size={size}: restarted with "
                     f"pruner.micro_batch_size={pruner.micro_batch_size} (memory only; the method's settings "
                     f"are unchanged)")
        console.print(f"[yellow]note:[/] {escape(notes[-1])}", highlight=False, soft_wrap=True)
