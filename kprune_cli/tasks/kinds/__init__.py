"""Task kinds as strategy objects: one module per kind, the protocol in :mod:`~kprune_cli.tasks.kinds.base`.

``kind_of(task)`` is what a caller asks instead of branching on ``task.kind``. **Adding a kind**: a
module here with a :class:`~kprune_cli.tasks.kinds.base.TaskKind` subclass, its instance in
:data:`KINDS`, and task specs naming it (:data:`kprune_cli.tasks.spec.TASKS`).
"""

from __future__ import annotations

from collections.abc import Sequence

from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.kinds.base import TaskKind
from kprune_cli.tasks.kinds.classification import Classification
from kprune_cli.tasks.kinds.embedding import SentenceEmbedding
from kprune_cli.tasks.kinds.qa import QuestionAnswering
from kprune_cli.tasks.kinds.regression import Regression
from kprune_cli.tasks.kinds.retrieval import PassageRetrieval
from kprune_cli.tasks.spec import TaskSpec

KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (Classification(), Regression(), QuestionAnswering(),
                                                            SentenceEmbedding(), PassageRetrieval())}
"""Every task kind by name (``TaskSpec.kind``)."""


def get_kind(name: str) -> TaskKind:
    """The kind called ``name``; a :class:`UserError` lists the known ones."""
    if name not in KINDS:
        raise UserError(f"unsupported task kind {name!r}: choose one of {', '.join(KINDS)}")
    return KINDS[name]


def kind_of(task: TaskSpec) -> TaskKind:
    """The kind of ``task``."""
    return get_kind(task.kind)


def compute_metrics(task: TaskSpec, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Every metric of ``task.metrics``, as fractions (see the kind's
    :meth:`~kprune_cli.tasks.kinds.base.TaskKind.metrics` for what ``predictions`` and ``references`` are)."""
    return kind_of(task).metrics(task, predictions, references)
