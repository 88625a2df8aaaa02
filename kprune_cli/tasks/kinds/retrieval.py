"""Passage retrieval with a sentence-embedding model (``task=squad_retrieval``): SQuAD questions retrieve
their paragraph among the paragraphs of held-out articles, ranked by cosine similarity.

The data are the SQuAD files of ``task=squad`` with the same split (one file alone, e.g. ``dev-v1.1.json``,
is split by article: the first half of the articles calibrates, the rest evaluates). Calibration
sequences are each drawn row's question and its paragraph, as separate texts; a paragraph asked about
several times comes once per drawn question (the sample's tokens are mostly paragraphs). No answer is read.
Evaluation: every question of the split is a query, every distinct paragraph of the split a passage;
recall@1, recall@10 and MRR@10 of the question's own paragraph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from kprune_cli.tasks.kinds.base import Predict
from kprune_cli.tasks.kinds.embedding import EMBEDDING_OUTPUT, SentenceEmbedding
from kprune_cli.tasks.kinds.qa import SquadFiles
from kprune_cli.tasks.metrics import RETRIEVAL_METRICS, gold_ranks
from kprune_cli.tasks.spec import TaskSpec


def passages(contexts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The distinct paragraphs of ``contexts`` in order of first appearance, and ``(rows,)`` the index of
    each row's paragraph among them."""
    index: dict[str, int] = {}
    gold = np.array([index.setdefault(context, len(index)) for context in contexts])
    return list(index), gold


class PassageRetrieval(SquadFiles, SentenceEmbedding):
    """A sentence-embedding model scored on question → paragraph retrieval; ``task.text_keys`` is
    ``(question key, paragraph key)``."""

    name: ClassVar[str] = "retrieval"

    def required_columns(self, task: TaskSpec, split: str) -> tuple[str, ...]:
        return task.text_keys

    def evaluation_features(self, task: TaskSpec, dataset: Dataset, tokenizer: PreTrainedTokenizerBase,
                            max_length: int) -> Dataset:
        """The rows' questions, then their distinct paragraphs (:func:`passages`), one feature each (calibration
        tokenises as :class:`SentenceEmbedding` does: each row's question and paragraph)."""
        question_key, passage_key = task.text_keys
        texts = [str(text).strip() for text in [*dataset[question_key], *passages(list(dataset[passage_key]))[0]]]
        features = Dataset.from_dict({"text": texts})
        return features.map(lambda batch, indices: {**tokenizer(batch["text"], truncation=True, max_length=max_length),
                                                    "example_id": indices},
                            batched=True, with_indices=True, remove_columns=["text"], desc="tokenize")

    def evaluate(self, task: TaskSpec, dataset: Dataset, features: Dataset, predict: Predict) -> dict[str, float]:
        """The ranks of each question's paragraph among the split's paragraphs by cosine similarity."""
        embeddings = np.stack(predict((EMBEDDING_OUTPUT,))[EMBEDDING_OUTPUT]).astype(np.float64)  # (features, d)
        embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        _, gold = passages(list(dataset[task.text_keys[1]]))
        queries, corpus = embeddings[:len(dataset)], embeddings[len(dataset):]
        return self.metrics(task, queries @ corpus.T, gold)

    def metrics(self, task: TaskSpec, predictions: Sequence, references: Sequence) -> dict[str, float]:
        """``predictions``: scores ``(queries, passages)``; ``references``: each query's gold passage ``(queries,)``."""
        ranks = gold_ranks(np.asarray(predictions), references)
        return {name: RETRIEVAL_METRICS[name](ranks) for name in task.metrics}
