"""SQuAD: official JSON, split by article, features and answer decoding (real dev data where present)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from datasets import Dataset
from tokenizers import ByteLevelBPETokenizer
from transformers import RobertaTokenizer

from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.data import load_task_data, tokenize_split
from kprune_cli.tasks.metrics import squad_scores
from kprune_cli.tasks.spec import get_task
from kprune_cli.tasks.squad import postprocess_predictions, read_squad_json, split_squad_by_article, tokenize_squad

CONTEXT = "Paris is the capital and most populous city of France. It hosts the Louvre museum."
QUESTION = "What is the capital of France?"


def official_file(path, version: str = "1.1") -> None:
    """A tiny SQuAD file in the official layout: 2 articles, 3 questions (one unanswerable in v2)."""
    paragraph = {"context": CONTEXT, "qas": [
        {"id": "q1", "question": QUESTION, "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "q2", "question": "Which museum?", "answers": [{"text": "the Louvre", "answer_start": 64}]},
    ]}
    other = {"context": "Nothing here.", "qas": [
        {"id": "q3", "question": "Who?", "answers": [], "is_impossible": True}]}
    path.write_text(json.dumps({"version": version, "data": [
        {"title": "Paris", "paragraphs": [paragraph]}, {"title": "Other", "paragraphs": [other]}]}))


def squad_slice(shared_dir, count: int):
    return read_squad_json(shared_dir / "data/squad/dev-v1.1.json").select(range(count))


def token_span(offsets: list, start: int, text: str) -> tuple[int, int] | None:
    """(first, last) token of the answer at character ``start`` if its characters are whole
    context tokens of this window, else None."""
    first = [i for i, offset in enumerate(offsets) if offset is not None and offset[0] == start]
    last = [i for i, offset in enumerate(offsets) if offset is not None and offset[1] == start + len(text)]
    return (first[0], last[-1]) if first and last else None


def gold_token_spans(example: dict, offsets: list) -> list[tuple[int, int]]:
    """The token spans of the gold answers of ``example`` that are whole tokens of this window."""
    spans = (token_span(offsets, start, text)
             for text, start in zip(example["answers"]["text"], example["answers"]["answer_start"]))
    return [span for span in spans if span is not None]


def test_official_json_is_flattened(tmp_path):
    official_file(tmp_path / "dev-v2.0.json", "v2.0")
    rows = read_squad_json(tmp_path / "dev-v2.0.json")
    assert rows.column_names == ["id", "title", "context", "question", "answers"]
    assert rows["id"] == ["q1", "q2", "q3"] and rows["title"] == ["Paris", "Paris", "Other"]
    assert rows[1]["answers"] == {"text": ["the Louvre"], "answer_start": [64]}
    assert rows[2]["answers"] == {"text": [], "answer_start": []}
    assert CONTEXT[64:74] == "the Louvre"
    (tmp_path / "bad.json").write_text('{"version": 1}')
    with pytest.raises(UserError, match="not a SQuAD file"):
        read_squad_json(tmp_path / "bad.json")


def test_local_squad_layouts(tmp_path):
    official_file(tmp_path / "train-v1.1.json")
    official_file(tmp_path / "dev-v1.1.json")
    data = load_task_data(get_task("squad"), tmp_path)
    assert list(data) == ["train", "validation"] and len(data["validation"]) == 3 and data.notes == []
    v2_dir = tmp_path / "v2"
    v2_dir.mkdir()
    official_file(v2_dir / "train.json")
    official_file(v2_dir / "validation.json")
    assert len(load_task_data(get_task("squad_v2"), v2_dir)["train"]) == 3


def test_split_by_article_on_real_dev(shared_dir):
    dev = read_squad_json(shared_dir / "data/squad/dev-v1.1.json")
    assert len(dev) == 10570
    titles = list(dict.fromkeys(dev["title"]))
    assert len(titles) == 48
    halves = split_squad_by_article(dev, 24)
    assert len(halves["train"]) + len(halves["validation"]) == 10570
    assert set(halves["train"]["title"]) == set(titles[:24])
    assert set(halves["validation"]["title"]) == set(titles[24:])
    for bad in (0, 48):
        with pytest.raises(UserError, match=f"first_articles={bad}"):
            split_squad_by_article(dev, bad)


def test_single_dev_file_is_split_and_noted(shared_dir):
    squad = get_task("squad")
    data = load_task_data(squad, shared_dir / "data/squad", first_articles=30)
    assert set(data["train"]["title"]).isdisjoint(data["validation"]["title"])
    assert len(set(data["train"]["title"])) == 30 and len(data["train"]) + len(data["validation"]) == 10570
    assert len(data.notes) == 1 and "split by article" in data.notes[0] and "0-29" in data.notes[0]
    evaluation_only = load_task_data(squad, shared_dir / "data/squad", splits=("validation",), first_articles=30)
    assert list(evaluation_only) == ["validation"]
    assert evaluation_only["validation"]["id"] == data["validation"]["id"]  # the same held-out articles


def test_training_positions_point_at_the_gold_answer(shared_dir, minilm_tokenizer):
    examples = squad_slice(shared_dir, 120)
    train = tokenize_squad(examples, minilm_tokenizer, 384, for_training=True)
    evaluation = tokenize_squad(examples, minilm_tokenizer, 384, for_training=False)
    assert train["example_id"] == evaluation["example_id"]  # same windows, in example order
    by_id = {example["id"]: example for example in examples}
    checked = 0
    for feature, window in zip(train, evaluation):
        answers = by_id[window["example_id"]]["answers"]
        span = token_span(window["offset_mapping"], answers["answer_start"][0], answers["text"][0])
        if span is not None:
            assert (feature["start_positions"], feature["end_positions"]) == span
            checked += 1
    assert checked > 100


def test_long_contexts_give_overlapping_windows(minilm_tokenizer, tmp_path):
    official_file(tmp_path / "dev-v1.1.json")
    examples = read_squad_json(tmp_path / "dev-v1.1.json").select([1])  # "the Louvre", at the end
    features = tokenize_squad(examples, minilm_tokenizer, 16, for_training=True, doc_stride=4)
    assert len(features) > 2 and set(features["example_id"]) == {"q2"}
    assert all(len(ids) <= 16 for ids in features["input_ids"])
    positions = list(zip(features["start_positions"], features["end_positions"]))
    assert positions[0] == (0, 0)  # the first window does not reach the answer: [CLS]
    found = [(ids, s, e) for ids, (s, e) in zip(features["input_ids"], positions) if s > 0]
    assert found and all(minilm_tokenizer.decode(ids[s:e + 1]) == "the louvre" for ids, s, e in found)


def test_peaked_logits_decode_to_the_gold_answer(shared_dir, minilm_tokenizer):
    examples = squad_slice(shared_dir, 80)
    features = tokenize_split(get_task("squad"), examples, minilm_tokenizer, for_training=False)
    by_id = {example["id"]: example for example in examples}
    starts, ends, answerable = [], [], set()
    for feature in features:
        start, end = np.zeros(len(feature["input_ids"])), np.zeros(len(feature["input_ids"]))
        spans = gold_token_spans(by_id[feature["example_id"]], feature["offset_mapping"])
        if spans:
            start[spans[0][0]], end[spans[0][1]] = 10.0, 10.0
            answerable.add(feature["example_id"])
        starts.append(start)
        ends.append(end)
    predictions = postprocess_predictions(examples, features, starts, ends)
    kept = [example for example in examples if example["id"] in answerable]
    assert len(kept) > 70
    assert all(predictions[example["id"]] in example["answers"]["text"] for example in kept)
    scores = squad_scores([predictions[example["id"]] for example in kept],
                          [example["answers"]["text"] for example in kept])
    assert scores == {"exact_match": 1.0, "f1": 1.0}


def test_logits_at_a_wrong_span_score_zero(shared_dir, minilm_tokenizer):
    examples = squad_slice(shared_dir, 200)
    examples = examples.filter(lambda example: min(example["answers"]["answer_start"]) > 100)
    examples = examples.select(range(min(30, len(examples))))
    features = tokenize_split(get_task("squad"), examples, minilm_tokenizer, for_training=False)
    starts, ends = [], []
    for feature in features:  # peak on the first two context tokens of every window
        first = next(i for i, offset in enumerate(feature["offset_mapping"]) if offset is not None)
        start, end = np.zeros(len(feature["input_ids"])), np.zeros(len(feature["input_ids"]))
        start[first], end[first + 1] = 5.0, 5.0
        starts.append(start)
        ends.append(end)
    predictions = postprocess_predictions(examples, features, starts, ends)
    for example in examples:
        assert example["context"].startswith(predictions[example["id"]])
    scores = squad_scores([predictions[i] for i in examples["id"]], [a["text"] for a in examples["answers"]])
    assert len(examples) >= 10 and scores["exact_match"] == 0.0


def tiny_features(tokenizer):
    example = {"id": ["q1"], "title": ["Paris"], "context": [CONTEXT], "question": [QUESTION],
               "answers": [{"text": ["Paris"], "answer_start": [0]}]}
    examples = Dataset.from_dict(example)
    features = tokenize_squad(examples, tokenizer, 384, for_training=False)
    offsets = features[0]["offset_mapping"]
    token_of = {CONTEXT[offset[0]:offset[1]]: i for i, offset in enumerate(offsets) if offset is not None}
    return examples, features, token_of, len(offsets)


def test_decoding_rules(minilm_tokenizer):
    examples, features, token_of, length = tiny_features(minilm_tokenizer)
    start, end = np.full(length, -10.0), np.full(length, -10.0)
    start[token_of["France"]], end[token_of["Paris"]] = 9.0, 9.0  # best start after best end: reversed
    start[token_of["capital"]], end[token_of["city"]] = 5.0, 5.0  # 5 tokens, score 10
    end[token_of["France"] + 1] = -1.0  # "France." scores 8

    def decode(**options) -> str:
        return postprocess_predictions(examples, features, [start], [end], **options)["q1"]

    assert decode() == "capital and most populous city"
    assert decode(max_answer_length=3) == "France."  # the 5-token span is too long
    start[1:8] = 50.0  # question tokens are never an answer
    assert decode() == "capital and most populous city"


def test_squad_v2_null_answer(minilm_tokenizer):
    examples, features, token_of, length = tiny_features(minilm_tokenizer)
    start, end = np.zeros(length), np.zeros(length)
    start[token_of["Paris"]], end[token_of["Paris"]] = 3.0, 3.0  # best span: 6.0
    start[0], end[0] = 4.0, 3.0  # null score: 7.0
    assert postprocess_predictions(examples, features, [start], [end], version_2=True)["q1"] == ""
    tolerant = postprocess_predictions(examples, features, [start], [end], version_2=True, null_threshold=1.5)
    assert tolerant["q1"] == "Paris"
    assert postprocess_predictions(examples, features, [start], [end])["q1"] == "Paris"  # v1.1: never empty


def test_tokenizer_without_segment_ids(tmp_path):
    """RoBERTa-style pairs (<s> q </s></s> c </s>, no token_type_ids) are handled."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CONTEXT, QUESTION, "Which museum?"] * 5, vocab_size=300, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    model = json.loads(bpe.to_str())["model"]
    tokenizer = RobertaTokenizer(vocab=model["vocab"], merges=[tuple(merge) for merge in model["merges"]])
    official_file(tmp_path / "dev-v1.1.json")
    examples = read_squad_json(tmp_path / "dev-v1.1.json").select([0, 1])
    task = dataclasses.replace(get_task("squad"), max_length=24, extra={"doc_stride": 4})
    train = tokenize_split(task, examples, tokenizer, for_training=True)
    assert "token_type_ids" not in train.column_names
    decoded = {tokenizer.decode(ids[s:e + 1]).strip() for ids, s, e in
               zip(train["input_ids"], train["start_positions"], train["end_positions"]) if s > 0}
    assert decoded == {"Paris", "the Louvre"}
