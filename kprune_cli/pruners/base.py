"""The contract between the pipeline and a pruner (docs/design.md §2).

The pipeline hands a pruner a :class:`PruneProblem` (plain objects: model, sample, FLOPs
model, budget) and gets back the keep-masks it chose; a pruner may also adjust the
model's weights in place (weight-tuning). Pruners never read files or configs.
Physical slicing, evaluation and saving happen afterwards, in the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel

from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.flops import CostModel, FlopsModel
from kprune_cli.models.latency_table import LatencyCost
from kprune_cli.models.masks import Masks
from kprune_cli.tasks.calibration import CalibrationSample
from kprune_cli.tasks.spec import TaskSpec


class StepStore(Protocol):
    """Where a pruner keeps its state after each finished step, to resume from it after a kill: opaque
    storage of nested mappings of tensors and JSON values (the pipeline's is
    :class:`~kprune_cli.runtime.steps.StepCheckpoints`)."""

    def load(self) -> dict[str, Any] | None:
        """The state saved last (tensors on the CPU), or None to start from the beginning."""

    def save(self, state: Mapping[str, Any], append_only: Sequence[str] = ()) -> None:
        """Keep ``state``; the entries of the mappings under ``append_only`` never change once saved."""

    def discard(self) -> None:
        """Forget all saved state (the pruner starts over)."""


@dataclass
class PruneProblem:
    """Everything a pruner may use.

    ``model`` is the fine-tuned model in eval mode on ``device``; it is also the teacher,
    so a pruner that needs the original outputs computes them before changing weights.
    The budget is ``(1 - rate) * flops.total(adapter.structure())``, or with ``latency`` (the
    measured table of ``constraint=latency``) the milliseconds the kept units may add to the emptied
    model so that the whole model takes ``1 - rate`` of the dense model's predicted time; ``cost`` is
    what a search spends it through. ``steps``: where a pruner
    that can resume (:class:`Resumable`) keeps its state (others ignore it).
    """

    model: PreTrainedModel
    adapter: ModelAdapter
    task: TaskSpec
    sample: CalibrationSample
    flops: FlopsModel
    rate: float
    device: torch.device
    seed: int = 0
    steps: StepStore | None = None
    latency: LatencyCost | None = None

    @property
    def cost(self) -> CostModel:
        """The cost model of the constraint: ``latency`` when given, else ``flops``."""
        return self.latency if self.latency is not None else self.flops

    @property
    def budget(self) -> float:
        return self.cost.budget(self.rate, self.adapter.structure())


@dataclass
class PruneResult:
    """The chosen masks, plus what the report should say about how they were found.

    ``notes`` holds human-readable remarks the report must show (e.g. a least-squares
    solve that fell back to a larger ridge); ``timing`` seconds per stage; ``settings`` the
    method's settings as it ran, those its config left to the task included (``{"gradient_batch": 12}``).
    """

    masks: Masks
    notes: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    settings: dict[str, int | float | str] = field(default_factory=dict)


class Pruner(Protocol):
    """A pruning method: a schedule over measure / search / tune stages.

    Optional parts of the contract, each a protocol of its own: :class:`MicroBatched` (a memory
    knob the out-of-memory retry may lower) and :class:`Resumable` (step checkpoints).
    """

    name: str
    needs_labels: bool
    """Whether the method reads the sample's gold targets (e.g. a task loss): such a pruner refuses
    an unlabeled calibration source."""

    def prune(self, problem: PruneProblem) -> PruneResult: ...


@runtime_checkable
class MicroBatched(Protocol):
    """A pruner with a memory knob: ``micro_batch_size`` sequences per forward/backward pass.

    Memory only: a result may change with it in the last float bits (sums taken in another
    order), never in what the method computes; the method's own batch (the gradient batch of
    K-prune's predictive knowledge and of Kwon et al.'s Fisher) is a separate setting that nothing
    changes behind the user's back. The out-of-memory retry lowers ``micro_batch_size`` only
    (:func:`~kprune_cli.core.safeguards.prune_with_memory_retry`). ``None``: the pruner's own choice.
    """

    micro_batch_size: int | None

    def micro_batch_of(self, problem: PruneProblem) -> int:
        """The sequences per pass the pruner uses on ``problem`` (``micro_batch_size``, or its choice for ``None``)."""


@runtime_checkable
class Resumable(Protocol):
    """A pruner that continues a killed run: it saves its ``state_dict()`` to ``problem.steps`` after each
    finished step and, when the store holds a saved state, continues from it with the same result.

    As with ``torch.nn.Module`` and optimizers, the state is a nested mapping of tensors and
    JSON-able values, and ``state["done"]`` counts the finished steps.
    """

    def state_dict(self) -> dict[str, Any]:
        """The state after the last finished step (tensors detached, on any device)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (as :meth:`state_dict` gave it) at the next :meth:`prune`."""
