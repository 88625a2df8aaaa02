"""evaluate_model against direct, one-example-at-a-time computations; measured sequence lengths."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from kprune_helpers import sharpen
from rich.progress import Progress
from scipy import stats
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kprune_cli.core.evaluation import evaluate_model, measure_avg_seq_len
from kprune_cli.tasks.data import load_task_data, tokenize_split
from kprune_cli.tasks.kinds import compute_metrics
from kprune_cli.tasks.spec import get_task
from kprune_cli.tasks.squad import postprocess_predictions

SST2 = dataclasses.replace(get_task("sst2"), max_length=48)
STSB = dataclasses.replace(get_task("stsb"), max_length=48)
MNLI = dataclasses.replace(get_task("mnli"), max_length=48)
SQUAD = dataclasses.replace(get_task("squad"), max_length=48, extra={"doc_stride": 16})


def sentences(count: int, seed: int, num_labels: int = 2) -> Dataset:
    """Sentences of 1 to 12 words with random labels."""
    generator = np.random.default_rng(seed)
    words = ["good", "bad", "movie", "plot", "it", "was", "not", "very", "fun", "dull"]
    return Dataset.from_list([
        {"sentence": " ".join(generator.choice(words, size=generator.integers(1, 13))),
         "label": int(generator.integers(num_labels))}
        for _ in range(count)
    ])


def direct_logits(model, tokenizer, texts: list[tuple[str, ...]], max_length: int) -> np.ndarray:
    """(examples, num_labels) logits, one unpadded example at a time."""
    with torch.no_grad():
        return np.stack([
            model(**tokenizer(*text, truncation=True, max_length=max_length, return_tensors="pt")).logits[0].numpy()
            for text in texts
        ])


def test_classification_matches_direct_computation(tiny_model, char_tokenizer):
    model, tokenizer, validation = tiny_model("bert"), char_tokenizer(), sentences(37, seed=0)
    progress = Progress()
    metrics = evaluate_model(model, tokenizer, SST2, DatasetDict(validation=validation), "cpu", batch_size=8,
                             progress=progress)
    logits = direct_logits(model, tokenizer, [(s,) for s in validation["sentence"]], 48)
    expected = np.mean(logits.argmax(-1) == np.array(validation["label"]))
    assert set(metrics) == {"accuracy"} and 0 < expected < 1
    assert metrics["accuracy"] == pytest.approx(expected)
    assert progress.tasks[0].completed == progress.tasks[0].total == 37


def test_bf16_evaluation_runs_the_forward_in_bf16_and_scores_close_to_float32(tiny_model, char_tokenizer):
    model, tokenizer = sharpen(tiny_model("distilbert", num_labels=1)), char_tokenizer(token_type_ids=False)
    left, right = sentences(30, seed=1), sentences(30, seed=2)
    validation = DatasetDict(validation=Dataset.from_dict({"sentence1": left["sentence"], "sentence2": right["sentence"],
                                                          "label": np.linspace(0, 5, 30).tolist()}))
    seen = []
    hook = model.pre_classifier.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    full = evaluate_model(model, tokenizer, STSB, validation, "cpu", batch_size=8)
    half = evaluate_model(model, tokenizer, STSB, validation, "cpu", batch_size=8, dtype=torch.bfloat16)
    hook.remove()
    assert set(seen) == {torch.float32, torch.bfloat16}
    assert half["pearson"] != full["pearson"] and half["pearson"] == pytest.approx(full["pearson"], abs=0.05)
    assert "forward" not in vars(model) and all(p.dtype == torch.float32 for p in model.parameters())


def test_regression_and_no_segment_ids(tiny_model, char_tokenizer):
    model, tokenizer = tiny_model("distilbert", num_labels=1), char_tokenizer(token_type_ids=False)
    left, right = sentences(30, seed=1), sentences(30, seed=2)
    validation = Dataset.from_dict({"sentence1": left["sentence"], "sentence2": right["sentence"],
                                    "label": np.linspace(0, 5, 30).tolist()})
    model.train()
    metrics = evaluate_model(model, tokenizer, STSB, DatasetDict(validation=validation), "cpu", batch_size=4)
    assert model.training  # the mode is restored
    model.eval()
    scores = direct_logits(model, tokenizer, list(zip(validation["sentence1"], validation["sentence2"])), 48)[:, 0]
    assert metrics["pearson"] == pytest.approx(stats.pearsonr(scores, validation["label"])[0], abs=1e-5)
    assert metrics["spearmanr"] == pytest.approx(stats.spearmanr(scores, validation["label"])[0], abs=1e-5)


def test_mnli_mismatched_metrics_get_a_prefix(tiny_model, char_tokenizer):
    model, tokenizer = tiny_model("bert", num_labels=3), char_tokenizer()
    splits = {}
    for seed, split in enumerate(MNLI.eval_splits):
        premises, hypotheses = sentences(20, seed, 3), sentences(20, seed + 10)
        splits[split] = Dataset.from_dict({"premise": premises["sentence"], "hypothesis": hypotheses["sentence"],
                                           "label": premises["label"]})
    metrics = evaluate_model(model, tokenizer, MNLI, DatasetDict(splits), "cpu", batch_size=6)
    assert set(metrics) == {"accuracy", "mm_accuracy"}
    for name, split in zip(("accuracy", "mm_accuracy"), MNLI.eval_splits):
        rows = splits[split]
        logits = direct_logits(model, tokenizer, list(zip(rows["premise"], rows["hypothesis"])), 48)
        assert metrics[name] == pytest.approx(np.mean(logits.argmax(-1) == np.array(rows["label"])))


def test_squad_matches_direct_decoding(tiny_model, char_tokenizer):
    model, tokenizer = tiny_model("bert", head="qa"), char_tokenizer()
    contexts = ["paris is the capital of france, and it hosts the louvre museum.", "the cat sat on the mat."]
    examples = Dataset.from_list([
        {"id": f"q{i}", "title": "t", "context": contexts[i % 2], "question": "where?" if i % 2 else "what is it?",
         "answers": {"text": ["paris"] if i % 2 == 0 else ["the mat"], "answer_start": [0] if i % 2 == 0 else [15]}}
        for i in range(6)
    ])
    metrics = evaluate_model(model, tokenizer, SQUAD, DatasetDict(validation=examples), "cpu", batch_size=4)
    features = tokenize_split(SQUAD, examples, tokenizer, for_training=False)
    assert len(features) > len(examples)  # the long context gives several windows
    starts, ends = [], []
    with torch.no_grad():
        for feature in features:  # one unpadded window at a time
            output = model(**{key: torch.tensor([feature[key]]) for key in ("input_ids", "token_type_ids")})
            starts.append(output.start_logits[0].numpy())
            ends.append(output.end_logits[0].numpy())
    answers = postprocess_predictions(examples, features, starts, ends)
    expected = compute_metrics(SQUAD, [answers[i] for i in examples["id"]], [a["text"] for a in examples["answers"]])
    assert set(metrics) == {"exact_match", "f1"} and 0 <= metrics["f1"] <= 1
    assert metrics == pytest.approx(expected)


def test_finetuned_minilm_on_real_mrpc(shared_dir):
    path = shared_dir / "models/minilm-mrpc"
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    task = get_task("mrpc")
    validation = load_task_data(task, shared_dir / "data/glue/mrpc", splits=("validation",))["validation"]
    validation = validation.select(range(64))
    metrics = evaluate_model(model, tokenizer, task, DatasetDict(validation=validation), "cpu", batch_size=16)
    batch = tokenizer(list(validation["sentence1"]), list(validation["sentence2"]), truncation=True, max_length=128,
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1).numpy()
    labels = np.array(validation["label"])
    assert metrics["accuracy"] == pytest.approx(np.mean(predictions == labels))
    true_positives = np.sum((predictions == 1) & (labels == 1))
    assert metrics["f1"] == pytest.approx(2 * true_positives / (np.sum(predictions == 1) + np.sum(labels == 1)))
    assert 0.6 < metrics["accuracy"] <= 1.0  # a fine-tuned model (0.80 on the full dev set)


@pytest.mark.parametrize(("name", "table"), [("mrpc", 53.24), ("sst2", 25.16), ("stsb", 31.47)])
def test_measured_lengths_match_the_published_table(shared_dir, minilm_tokenizer, name, table):
    """The K-prune code's dev-set averages (BERT uncased vocabulary, as MiniLM's) are reproduced."""
    task = get_task(name)
    validation = load_task_data(task, shared_dir / f"data/glue/{name}", splits=("validation",))["validation"]
    assert measure_avg_seq_len(task, validation, minilm_tokenizer) == pytest.approx(table, abs=0.005)


def test_measured_length_of_squad_counts_windows(char_tokenizer):
    examples = Dataset.from_list([{"id": "a", "title": "t", "context": "x " * 60, "question": "why?",
                                   "answers": {"text": ["x"], "answer_start": [0]}}])
    lengths = [len(ids) for ids in tokenize_split(SQUAD, examples, char_tokenizer(), for_training=False)["input_ids"]]
    assert len(lengths) > 1 and max(lengths) == 48
    assert measure_avg_seq_len(SQUAD, examples, char_tokenizer()) == pytest.approx(np.mean(lengths))
