"""Task metrics as plain functions (no hub): GLUE and SQuAD v1.1 / v2.0, as fractions.

``evaluate.load("glue")`` and ``evaluate.load("squad")`` fetch scripts from the hub, so the
metrics are re-implemented here after their definitions: GLUE's (scikit-learn / SciPy
formulas) and the official SQuAD evaluation scripts (answer normalisation, token F1,
maximum over the gold answers; v2.0: an empty prediction matches an unanswerable question).
Every metric is a fraction in [0, 1] (or [-1, 1] for correlations), never a percentage.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import partial

import numpy as np
from scipy.stats import rankdata

from kprune_cli.tasks.spec import TaskSpec

_PUNCTUATION = frozenset(string.punctuation)


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Fraction of predictions equal to their reference."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    return float((predictions == references).mean())


def f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Binary F1 of the positive class 1; 0.0 when there is no true positive."""
    predictions, references = np.asarray(predictions) == 1, np.asarray(references) == 1
    true_positives = int((predictions & references).sum())
    if true_positives == 0:
        return 0.0
    return 2 * true_positives / (int(predictions.sum()) + int(references.sum()))


def matthews_correlation(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Matthews correlation coefficient (multi-class form); 0.0 when it is undefined."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    classes = np.union1d(predictions, references)
    confusion = np.zeros((len(classes), len(classes)))  # (true, predicted)
    np.add.at(confusion, (np.searchsorted(classes, references), np.searchsorted(classes, predictions)), 1)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    samples, correct = confusion.sum(), np.trace(confusion)
    covariance = correct * samples - true_counts @ predicted_counts
    scale = np.sqrt((samples**2 - predicted_counts @ predicted_counts) * (samples**2 - true_counts @ true_counts))
    return float(covariance / scale) if scale > 0 else 0.0


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when either side is constant (undefined)."""
    x = np.asarray(predictions, dtype=np.float64)
    y = np.asarray(references, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    scale = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / scale) if scale > 0 else 0.0


def spearmanr(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the ranks, ties given their average rank."""
    return pearson(rankdata(predictions), rankdata(references))


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Token-level F1 of the normalised strings; two empty answers match (SQuAD v2.0)."""
    predicted_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted_tokens or not gold_tokens:
        return float(predicted_tokens == gold_tokens)
    common = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
                 version_2: bool = False) -> dict[str, float]:
    """``exact_match`` and ``f1`` averaged over questions, each the maximum over its gold answers.

    ``references[i]`` lists the gold answer texts of question i. With ``version_2`` (the
    official v2.0 script) gold answers that normalise to nothing are dropped and a question
    left without any is unanswerable: only the empty prediction scores on it. v2.0 also gives
    the official script's splits, as fractions: ``HasAns_exact_match`` / ``HasAns_f1`` over the
    questions with gold answers (its ``HasAns_exact`` / ``HasAns_f1``; a question counts as
    answerable when it has any, as there) and ``NoAns_exact_match`` / ``NoAns_f1`` over those
    without; a split without questions is left out, as there.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions")
    exact, overlap = [], []
    for prediction, golds in zip(predictions, references):
        if version_2:
            golds = [gold for gold in golds if normalize_answer(gold)] or [""]
        exact.append(max(squad_exact(prediction, gold) for gold in golds))
        overlap.append(max(squad_f1(prediction, gold) for gold in golds))
    scores = {"exact_match": float(np.mean(exact)), "f1": float(np.mean(overlap))}
    if version_2:
        answerable = np.array([len(golds) > 0 for golds in references])
        for name, members in (("HasAns", answerable), ("NoAns", ~answerable)):
            if members.any():
                scores[f"{name}_exact_match"] = float(np.mean(np.asarray(exact)[members]))
                scores[f"{name}_f1"] = float(np.mean(np.asarray(overlap)[members]))
    return scores


def gold_ranks(scores: np.ndarray, gold: Sequence[int]) -> np.ndarray:
    """``(queries,)`` rank (1 = first) of each query's gold passage ``gold[i]`` among ``scores``
    ``(queries, passages)``; a passage scoring the same as the gold one does not rank before it."""
    gold = np.asarray(gold)
    gold_scores = scores[np.arange(len(gold)), gold]  # (queries,)
    return 1 + (scores > gold_scores[:, None]).sum(axis=1)


def recall_at(ranks: np.ndarray, k: int) -> float:
    """Fraction of queries whose gold passage ranks in the first ``k``."""
    return float((ranks <= k).mean())


def mrr_at(ranks: np.ndarray, k: int) -> float:
    """Mean reciprocal rank of the gold passage, counted as 0 beyond rank ``k``."""
    return float(np.where(ranks <= k, 1.0 / ranks, 0.0).mean())


RETRIEVAL_METRICS = {"recall_at_1": partial(recall_at, k=1), "recall_at_10": partial(recall_at, k=10),
                     "mrr_at_10": partial(mrr_at, k=10)}
"""The metrics of a retrieval task by name, each of the gold passages' ranks ``(queries,)``."""


LABEL_METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearmanr,
}
"""The metrics of labelled examples by name, each ``(predictions, references) -> float``."""


def label_metrics(task: TaskSpec, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Every metric of ``task.metrics`` from :data:`LABEL_METRICS`, of ``predictions`` (class ids or scores)
    and ``references`` (labels), both ``(examples,)``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return {name: LABEL_METRICS[name](predictions, references) for name in task.metrics}
