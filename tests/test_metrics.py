"""Offline task metrics against values worked out by hand (and SciPy for correlations)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from kprune_cli.tasks.kinds import compute_metrics
from kprune_cli.tasks.metrics import (
    accuracy,
    f1,
    matthews_correlation,
    normalize_answer,
    pearson,
    spearmanr,
    squad_f1,
    squad_scores,
)
from kprune_cli.tasks.spec import get_task

# TP = 2 (rows 0, 4), TN = 1 (row 2), FP = 1 (row 1), FN = 1 (row 3).
PREDICTED = [1, 1, 0, 0, 1]
GOLD = [1, 0, 0, 1, 1]


def test_accuracy_and_binary_f1_by_hand():
    assert accuracy(PREDICTED, GOLD) == pytest.approx(3 / 5)
    assert f1(PREDICTED, GOLD) == pytest.approx(2 / 3)  # precision = recall = 2/3
    assert f1([0, 0, 1], [1, 1, 0]) == 0.0  # no true positive


def test_matthews_correlation_by_hand():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2)
    assert matthews_correlation(PREDICTED, GOLD) == pytest.approx(1 / 6)
    assert matthews_correlation(GOLD, GOLD) == pytest.approx(1.0)
    assert matthews_correlation([1 - g for g in GOLD], GOLD) == pytest.approx(-1.0)
    assert matthews_correlation([1] * 5, GOLD) == 0.0  # undefined: constant predictions
    # 3 classes: confusion rows (gold) [1,0,0], [0,1,1], [1,0,0] -> (2*4 - 5) / sqrt((16-6)(16-6)) = 0.3
    assert matthews_correlation([0, 1, 2, 0], [0, 1, 1, 2]) == pytest.approx(0.3)


def test_correlations_by_hand():
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(math.sqrt(27 / 28))
    # ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]: 4.5 / sqrt(4.5 * 5)
    assert spearmanr([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    assert spearmanr([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert pearson([2, 2, 2], [1, 2, 3]) == 0.0  # undefined: constant predictions


def test_correlations_agree_with_scipy():
    generator = np.random.default_rng(0)
    x = generator.normal(size=200)
    y = x + generator.normal(size=200)
    y[:20] = np.round(y[:20])  # some ties
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearmanr(np.round(x, 1), y) == pytest.approx(stats.spearmanr(np.round(x, 1), y)[0], abs=1e-12)


def test_squad_normalisation_and_token_f1():
    assert normalize_answer("The  Cat's, a hat!") == "cats hat"
    assert normalize_answer("An apple") == "apple"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    # "cat sat" vs "cat sat down": precision 1, recall 2/3
    assert squad_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert squad_f1("dog", "cat") == 0.0


def test_squad_scores_take_the_best_gold_answer():
    scores = squad_scores(["Denver Broncos", "in the year 1990"],
                          [["Broncos", "the Denver Broncos"], ["1990", "2000"]])
    # question 1 exact (after dropping "the"); question 2: "in year 1990" vs "1990": F1 = 2 * 1/3 * 1 / (4/3) = 0.5
    assert scores == {"exact_match": pytest.approx(0.5), "f1": pytest.approx(0.75)}


def test_squad_v2_unanswerable_questions():
    predictions, references = ["", "Paris", "", "Paris"], [[], [], ["Paris"], ["Paris"]]
    v2 = squad_scores(predictions, references, version_2=True)
    assert v2["exact_match"] == pytest.approx(0.5) and v2["f1"] == pytest.approx(0.5)
    # v2 drops gold answers that normalise to nothing: "the" counts as no answer
    assert squad_scores([""], [["the"]], version_2=True)["exact_match"] == 1.0
    assert squad_scores(["x"], [["the"]], version_2=True)["exact_match"] == 0.0


def test_compute_metrics_returns_the_task_metrics_as_fractions():
    assert compute_metrics(get_task("mrpc"), PREDICTED, GOLD) == {
        "accuracy": pytest.approx(0.6), "f1": pytest.approx(2 / 3)}
    assert compute_metrics(get_task("cola"), PREDICTED, GOLD) == {"matthews_correlation": pytest.approx(1 / 6)}
    assert compute_metrics(get_task("stsb"), [1.0, 2.0, 3.0], [1.0, 2.0, 4.0]) == {
        "pearson": pytest.approx(math.sqrt(27 / 28)), "spearmanr": pytest.approx(1.0)}
    squad = compute_metrics(get_task("squad"), ["Paris", "in Rome"], [["Paris"], ["Rome", "Milan"]])
    assert squad == {"exact_match": pytest.approx(0.5), "f1": pytest.approx((1 + 2 / 3) / 2)}
    assert compute_metrics(get_task("squad_v2"), [""], [[]]) == {"exact_match": 1.0, "f1": 1.0,
                                                                "NoAns_exact_match": 1.0, "NoAns_f1": 1.0}
    with pytest.raises(ValueError):
        compute_metrics(get_task("sst2"), [1, 0], [1])
