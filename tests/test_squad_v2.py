"""SQuAD v2.0: the official v2 evaluation script's semantics on hand-computed cases, and one end-to-end run
on a v2 file built from v1.1 dev paragraphs (no v2 data is shipped here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kprune
from datasets import Dataset
from transformers import BertConfig, BertForQuestionAnswering

from kprune_cli.tasks.kinds import compute_metrics
from kprune_cli.tasks.metrics import squad_scores
from kprune_cli.tasks.spec import get_task
from kprune_cli.tasks.squad import postprocess_predictions, tokenize_squad

# (gold answers, prediction, exact, F1) as the official v2 script scores them (get_raw_scores):
# gold texts that normalise to nothing are dropped, a question left without any takes [""] as gold,
# and a question counts as answerable (HasAns) when its answer list is not empty.
HAND_CASES = [
    (["Denver Broncos", "Broncos"], "the Broncos", 1.0, 1.0),  # "broncos" after normalisation
    (["1990"], "in 1990", 0.0, 2 / 3),                        # precision 1/2, recall 1
    (["the"], "", 1.0, 1.0),                                  # answerable, but its gold normalises to ""
    ([], "", 1.0, 1.0),                                       # unanswerable, abstained
    ([], "Paris", 0.0, 0.0),                                  # unanswerable, answered
    (["Paris"], "", 0.0, 0.0),                                # answerable, abstained
]


def test_v2_scores_and_splits_match_the_official_script():
    golds, predictions, exact, f1 = zip(*HAND_CASES)
    scores = squad_scores(list(predictions), list(golds), version_2=True)
    assert scores == pytest.approx({
        "exact_match": 3 / 6, "f1": (1 + 2 / 3 + 1 + 1) / 6,
        "HasAns_exact_match": (1 + 0 + 1 + 0) / 4, "HasAns_f1": (1 + 2 / 3 + 1 + 0) / 4,
        "NoAns_exact_match": 1 / 2, "NoAns_f1": 1 / 2,
    })
    for gold, prediction, one_exact, one_f1 in HAND_CASES:
        single = squad_scores([prediction], [gold], version_2=True)
        assert (single["exact_match"], single["f1"]) == pytest.approx((one_exact, one_f1))
        # a split without questions is left out, as the official script leaves it out
        assert ("HasAns_f1" in single, "NoAns_f1" in single) == (bool(gold), not gold)
    assert compute_metrics(get_task("squad_v2"), list(predictions), list(golds)) == scores
    assert set(squad_scores(["Broncos"], [["Broncos"]])) == {"exact_match", "f1"}  # v1.1: no splits


CONTEXT = ("Paris is the capital and most populous city of France. It hosts the Louvre museum, "
           "the most visited art museum in the world, and the Eiffel Tower, built for the fair of 1889.")


def two_windows(tokenizer):
    """One question whose context is cut into (at least) two overlapping windows."""
    examples = Dataset.from_dict({"id": ["q"], "title": ["t"], "context": [CONTEXT],
                                  "question": ["What is the capital of France?"],
                                  "answers": [{"text": ["Paris"], "answer_start": [0]}]})
    features = tokenize_squad(examples, tokenizer, 32, for_training=False, doc_stride=8)
    assert len(features) >= 2
    return examples, features


def test_null_answer_takes_the_lowest_null_score_and_a_strict_threshold(minilm_tokenizer):
    examples, features = two_windows(minilm_tokenizer)
    starts = [np.full(len(row["offset_mapping"]), -10.0) for row in features]
    ends = [values.copy() for values in starts]
    first = [i for i, offset in enumerate(features[0]["offset_mapping"]) if offset is not None][0]
    for window in range(len(features)):
        starts[window][0], ends[window][0] = 4.0, 4.0  # null score of every window: 8 ...
    starts[0][first], ends[0][first] = 3.0, 3.0   # best span, window 0: score 6
    starts[1][0], ends[1][0] = 2.0, 3.0           # ... but 5 in window 1, the lowest: it counts
    answer = CONTEXT[slice(*features[0]["offset_mapping"][first])]

    def decode(threshold: float) -> str:
        return postprocess_predictions(examples, features, starts, ends, version_2=True,
                                       null_threshold=threshold)["q"]

    # null - best = 5 - 6 = -1: the span, unless the threshold is below -1 (strictly greater empties it)
    assert decode(0.0) == answer and decode(-1.0) == answer and decode(-1.5) == ""
    starts[1][0] = 5.0                            # window 1's null score 8: null - best = 2
    assert decode(0.0) == "" and decode(2.0) == answer
    assert postprocess_predictions(examples, features, starts, ends)["q"] == answer  # v1.1 never abstains


def v2_from_v1(v1: dict, articles: int = 4, paragraphs: int = 2, questions: int = 3) -> dict:
    """A SQuAD v2.0 file from the first ``articles`` articles of a v1.1 file: per paragraph its first
    ``questions`` questions, answerable, plus those of the same paragraph of the next article (cyclically)
    moved onto it and marked impossible (they ask about another article)."""
    chosen = [[dict(paragraph, qas=paragraph["qas"][:questions]) for paragraph in article["paragraphs"][:paragraphs]]
              for article in v1["data"][:articles]]
    data = []
    for index, article in enumerate(chosen):
        donor = chosen[(index + 1) % articles]
        built = []
        for place, paragraph in enumerate(article):
            moved = [{"id": f"{qa['id']}-moved", "question": qa["question"], "answers": [], "is_impossible": True,
                      "plausible_answers": qa["answers"]} for qa in donor[place]["qas"]]
            answerable = [dict(qa, is_impossible=False) for qa in paragraph["qas"]]
            built.append({"context": paragraph["context"], "qas": answerable + moved})
        data.append({"title": v1["data"][index]["title"], "paragraphs": built})
    return {"version": "v2.0", "data": data}


def tiny_qa_checkpoint(directory: Path, tokenizer) -> Path:
    """A 2-layer, 4-head, hidden-32 random BERT QA model on the MiniLM vocabulary (fast tokenizer, 384-token
    windows) that abstains on some questions and answers others: position 0 ([CLS]) gets a large first
    hidden feature, which the QA head weighs just enough for the null score to compete with the best span."""
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForQuestionAnswering(config)
    with torch.no_grad():
        model.bert.embeddings.position_embeddings.weight[0, 0] += 3.0
        model.qa_outputs.weight[:, 0] = 0.05
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("pruner", ["kprune", "kwon"])
def test_a_v2_file_runs_end_to_end(pruner, shared_dir, minilm_tokenizer, tmp_path, capsys):
    v1 = json.loads((shared_dir / "data/squad/dev-v1.1.json").read_text())
    v2 = v2_from_v1(v1)
    data = tmp_path / "squad2"
    data.mkdir()
    (data / "dev-v2.0.json").write_text(json.dumps(v2))
    checkpoint = tiny_qa_checkpoint(tmp_path / "tiny-qa", minilm_tokenizer)
    output = tmp_path / "out"
    assert kprune("run", "task=squad_v2", f"model.path={checkpoint}", f"data_dir={data}", f"pruner={pruner}",
                  "rate=0.5", "calibration.num_examples=24", "device=cpu", f"output_dir={output}") == 0
    report = json.loads((output / "report.json").read_text())

    evaluated = [qa for article in v2["data"][2:] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    has_answer = sum(bool(qa["answers"]) for qa in evaluated)
    assert any("split by article" in note for note in report["notes"])
    for side in ("dense", "pruned"):
        metrics = report["metric"]["all"][side]
        assert set(metrics) == {"exact_match", "f1", "HasAns_exact_match", "HasAns_f1",
                                "NoAns_exact_match", "NoAns_f1"}
        for name in ("exact_match", "f1"):  # the whole is the question-weighted mean of its splits
            whole = (metrics[f"HasAns_{name}"] * has_answer
                     + metrics[f"NoAns_{name}"] * (len(evaluated) - has_answer)) / len(evaluated)
            assert metrics[name] == pytest.approx(whole)
    dense = report["metric"]["all"]["dense"]
    assert dense["NoAns_exact_match"] > 0 and dense["NoAns_exact_match"] < 1  # abstained on some, answered others
    # 24 drawn questions of the train articles, about half of them impossible; all windows kept
    assert report["sample"]["examples"] == 24 and report["sample"]["windows"] >= 24
    assert report["pruner_settings"] == {"gradient_batch": 12}
    assert report["flops"]["reduction"] == pytest.approx(0.5, abs=0.02)
