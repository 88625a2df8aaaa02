"""The contract between the pipeline and a pruner (docs/design.md §2).

The pipeline hands a pruner a :class:`PruneProblem` (plain objects: model, sample, FLOPs
model, budget) and gets back the keep-masks it chose; a pruner may also adjust the
model's weights in place (weight-tuning). Pruners never read files or configs.
Physical slicing, evaluation and saving happen afterwards, in the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import PreTrainedModel

from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.flops import FlopsModel
from kprune_cli.models.masks import Masks
from kprune_cli.tasks.calibration import CalibrationSample
from kprune_cli.tasks.spec import TaskSpec


@dataclass
class PruneProgress:
    """Where a sub-layer-wise pruner stands: sub-layers ``< done`` are final (masks decided, weights
    tuned); ``budget`` FLOPs are left for the others; ``notes`` and ``timing`` as in :class:`PruneResult`."""

    done: int
    masks: Masks
    budget: float
    notes: list[str]
    timing: dict[str, float]


class StepStore(Protocol):
    """Where a pruner keeps its progress after each finished sub-layer, to resume from it after a kill
    (the pipeline's is :class:`~kprune_cli.core.resume.StepCheckpoints`)."""

    def last(self, device: torch.device) -> PruneProgress | None:
        """The progress saved last (masks on ``device``), or None to start from sub-layer 0."""

    def restore(self, adapter: ModelAdapter, done: int) -> None:
        """Load the tuned weights of sub-layers ``< done`` into the model."""

    def save(self, adapter: ModelAdapter, progress: PruneProgress, tuned: bool) -> None:
        """Keep ``progress``, with the weights of sub-layer ``progress.done - 1`` when ``tuned``."""

    def discard(self) -> None:
        """Forget all saved progress (the pruner starts over)."""


@dataclass
class PruneProblem:
    """Everything a pruner may use.

    ``model`` is the fine-tuned model in eval mode on ``device``; it is also the teacher,
    so a pruner that needs the original outputs computes them before changing weights.
    The budget is ``(1 - rate) * flops.total(adapter.structure())``. ``steps``: where a pruner
    that can resume keeps its progress (others ignore it).
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

    @property
    def budget(self) -> float:
        return (1.0 - self.rate) * self.flops.total(self.adapter.structure())


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
    """A pruning method: a schedule over measure / search / tune stages."""

    name: str
    needs_labels: bool
    """Whether the method reads the sample's gold targets (e.g. a task loss): such a pruner refuses
    an unlabeled calibration source."""

    def prune(self, problem: PruneProblem) -> PruneResult: ...
