"""Guards of a pruning run: no broken model is saved, and GPU memory shortage is retried.

:func:`non_finite_tensors` finds NaN or infinite weights (checked before pruning, in the model
given, and after, in the pruned one); :func:`prune_with_memory_retry` restarts a pruner that ran
out of GPU memory with half its batch size.
"""

from __future__ import annotations

import torch
from rich.markup import escape

from kprune_cli.pruners.base import PruneProblem, Pruner, PruneResult
from kprune_cli.runtime.console import console


class NonFiniteWeights(RuntimeError):
    """Pruning left NaN or infinite weights: the run fails and nothing is saved."""


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` holding NaN or ±inf."""
    return [name for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def listed(names: list[str], limit: int = 3) -> str:
    """The first ``limit`` names, and how many more there are, for an error message."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def prune_with_memory_retry(pruner: Pruner, problem: PruneProblem, notes: list[str]) -> PruneResult:
    """``pruner.prune(problem)``; on a GPU out-of-memory error, restore the weights and start again
    with ``pruner.batch_size`` halved (pruners without that attribute are not retried).

    The weights are kept on the CPU meanwhile (a pruner may tune them in place), and the step
    checkpoints of the failed attempt are dropped. Each retry adds a line to ``notes``; with a
    batch size of 1 the error stands.
    """
    if problem.device.type != "cuda" or not hasattr(pruner, "batch_size"):
        return pruner.prune(problem)
    weights = {name: tensor.detach().to("cpu", copy=True) for name, tensor in problem.model.state_dict().items()}
    while True:
        try:
            return pruner.prune(problem)
        except torch.OutOfMemoryError:
            size = pruner.batch_size or max(int(batch["input_ids"].shape[0]) for batch in problem.sample.batches)
            if size <= 1:
                raise
        problem.model.load_state_dict(weights)
        if problem.steps is not None:
            problem.steps.discard()
        torch.cuda.empty_cache()
        pruner.batch_size = size // 2
        notes.append(f"pruning ran out of GPU memory with pruner.batch_size={size}: "
                     f"restarted with pruner.batch_size={pruner.batch_size}")
        console.print(f"[yellow]note:[/] {escape(notes[-1])}", highlight=False, soft_wrap=True)
