"""The official codes' gradient batch: how many sequences share one squared gradient, in K-prune's
predictive knowledge and in Kwon et al.'s Fisher information.

Both official codes draw their sample into a ``DataLoader`` of the same batch size and square one
gradient per batch: ``batch_size = int((12 if IS_SQUAD else 32) * (0.5 if IS_LARGE else 1))``
(snudm-starlab/K-prune ``src/main.py``; WoosukKwon/retraining-free-pruning ``main.py``, there named
``sample_batch_size``), with ``IS_LARGE = "large" in args.model_name``. The batch size is part of
either method, not only a memory setting: the same sample in batches of another size gives other
scores.
"""

from __future__ import annotations

from kprune_cli.tasks.kinds import kind_of
from kprune_cli.tasks.kinds.base import GLUE_GRADIENT_BATCH, SQUAD_GRADIENT_BATCH
from kprune_cli.tasks.spec import TaskSpec

__all__ = ["GLUE_GRADIENT_BATCH", "SQUAD_GRADIENT_BATCH", "LARGE_HIDDEN_SIZE", "official_gradient_batch"]
LARGE_HIDDEN_SIZE = 1024
"""A model at least this wide counts as large (BERT-large, RoBERTa-large): its gradient batch is halved."""


def official_gradient_batch(task: TaskSpec, hidden_size: int) -> int:
    """Sequences per gradient batch in the official codes: 32 for GLUE, 12 for SQuAD, half for a large model.

    Deviation: the official codes call a model large when its *name* contains ``large``; a local
    checkpoint's path need not say so, so here a model is large when ``hidden_size >=``
    :data:`LARGE_HIDDEN_SIZE` (the same models among BERT and RoBERTa).
    """
    size = kind_of(task).gradient_batch  # GLUE_GRADIENT_BATCH, SQUAD_GRADIENT_BATCH
    return size // 2 if hidden_size >= LARGE_HIDDEN_SIZE else size
