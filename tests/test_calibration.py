"""The calibration sample: seeded draw without replacement up to a token count or of an example
count, bounded work."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from datasets import Dataset

from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks import calibration
from kprune_cli.tasks.calibration import (
    DRAW_INDEX,
    CalibrationSample,
    draw_calibration_examples,
    draw_calibration_sample,
)
from kprune_cli.tasks.data import load_task_data, tokenize_split
from kprune_cli.tasks.spec import get_task
from kprune_cli.tasks.squad import read_squad_json

TASK = dataclasses.replace(get_task("sst2"), max_length=32)


def sentences(count: int) -> Dataset:
    """Unique sentences of varied length; label 1 exactly for the "odd" ones."""
    return Dataset.from_list([
        {"sentence": " ".join(["odd" if i % 2 else "even", "row", str(i)] + ["x"] * (i % 5)), "label": i % 2}
        for i in range(count)
    ])


def rows_of(sample) -> list[tuple[int, ...]]:
    """The unpadded input ids of every sequence in the sample."""
    return [tuple(ids[mask.bool()].tolist()) for batch in sample.batches
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def test_draws_the_shortest_prefix_of_a_seeded_permutation(char_tokenizer, monkeypatch):
    monkeypatch.setattr(calibration, "FIRST_CHUNK_ROWS", 7)  # force several top-ups
    tokenizer, train = char_tokenizer(), sentences(300)
    sample = draw_calibration_sample(TASK, train, tokenizer, num_tokens=1000, seed=3, batch_size=16)
    expected, total = [], 0
    for row in np.random.default_rng(3).permutation(len(train)):
        if total >= 1000:
            break
        ids = tokenizer(train[int(row)]["sentence"], truncation=True, max_length=32)["input_ids"]
        expected.append(tuple(ids))
        total += len(ids)
    assert sorted(rows_of(sample)) == sorted(expected)
    assert sample.num_tokens == total and sample.num_examples == len(expected)
    assert len(set(rows_of(sample))) == len(expected)  # without replacement


def test_batches_are_length_sorted_padded_and_labelled(char_tokenizer):
    tokenizer = char_tokenizer()
    sample = draw_calibration_sample(TASK, sentences(200), tokenizer, num_tokens=600, seed=0, batch_size=8)
    widths = [batch["input_ids"].shape[1] for batch in sample.batches]
    assert widths == sorted(widths, reverse=True) and all(len(b["input_ids"]) <= 8 for b in sample.batches)
    for batch in sample.batches:
        assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels", DRAW_INDEX}
        assert batch["attention_mask"].sum(dim=1).max() == batch["input_ids"].shape[1]  # padded to its longest
        for ids, label in zip(batch["input_ids"], batch["labels"]):
            assert ("odd" in tokenizer.decode(ids, skip_special_tokens=True)) == bool(label)


def test_draw_indices_number_the_sequences_in_draw_order(char_tokenizer):
    sample = draw_calibration_sample(TASK, sentences(200), char_tokenizer(), num_tokens=600, seed=0, batch_size=8)
    indices = torch.cat(sample.draw_indices())
    assert sorted(indices.tolist()) == list(range(sample.num_examples))
    assert indices.tolist() != sorted(indices.tolist())  # the batches are sorted by length, not drawn order
    # A sample made by hand, without recorded indices, counts in batch order.
    bare = CalibrationSample([{k: v for k, v in batch.items() if k != DRAW_INDEX} for batch in sample.batches])
    assert torch.cat(bare.draw_indices()).tolist() == list(range(sample.num_examples))


def test_in_draw_order_rebatches_the_same_sequences(char_tokenizer):
    sample = draw_calibration_sample(TASK, sentences(200), char_tokenizer(), num_tokens=600, seed=0, batch_size=8)
    again = sample.in_draw_order(5)

    def sequences(s):  # draw index -> (real token ids, label)
        return {int(i): (ids[mask.bool()].tolist(), int(label))
                for batch, draws in zip(s.batches, s.draw_indices())
                for i, ids, mask, label in zip(draws, batch["input_ids"], batch["attention_mask"], batch["labels"])}

    assert sequences(again) == sequences(sample)
    assert torch.cat(again.draw_indices()).tolist() == list(range(sample.num_examples))
    assert [len(b["input_ids"]) for b in again.batches][:-1] == [5] * (len(again.batches) - 1)
    for batch in again.batches:  # right-padded to the longest sequence of the batch
        mask = batch["attention_mask"]
        assert mask.sum(dim=1).max() == mask.shape[1]
        assert torch.equal(mask, (torch.arange(mask.shape[1])[None, :] < mask.sum(dim=1)[:, None]).long())


def test_same_seed_same_sample(char_tokenizer):
    tokenizer, train = char_tokenizer(), sentences(200)
    first, again, other = (draw_calibration_sample(TASK, train, tokenizer, 500, seed) for seed in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first.batches, again.batches) for k in a)
    assert rows_of(first) != rows_of(other)


def test_small_split_is_used_whole_with_a_warning(char_tokenizer, caplog):
    train = sentences(10)
    with caplog.at_level(logging.WARNING, logger="kprune_cli.tasks.calibration"):
        sample = draw_calibration_sample(TASK, train, char_tokenizer(), num_tokens=10**6, seed=0)
    assert sample.num_examples == 10 and "fewer than the 1000000 asked" in caplog.text
    with pytest.raises(UserError, match="num_tokens=0"):
        draw_calibration_sample(TASK, train, char_tokenizer(), num_tokens=0, seed=0)


def test_only_drawn_rows_are_tokenised(shared_dir, minilm_tokenizer, monkeypatch):
    task = get_task("sst2")
    train = load_task_data(task, shared_dir / "data/glue/sst2", splits=("train",))["train"]
    tokenised = []
    original = calibration.tokenize_split

    def counting(task, dataset, tokenizer, *, for_training):
        tokenised.append(len(dataset))
        return original(task, dataset, tokenizer, for_training=for_training)

    monkeypatch.setattr(calibration, "tokenize_split", counting)
    sample = draw_calibration_sample(task, train, minilm_tokenizer, num_tokens=20_000, seed=0)
    assert len(train) == 67_349 and sample.num_tokens >= 20_000
    assert sum(tokenised) < 1.3 * sample.num_examples + 256  # first chunk + a top-up, not the whole split


def test_squad_counts_every_window_of_a_question(shared_dir, minilm_tokenizer):
    task = dataclasses.replace(get_task("squad"), max_length=96, extra={"doc_stride": 32})
    train = read_squad_json(shared_dir / "data/squad/dev-v1.1.json").select(range(400))
    sample = draw_calibration_sample(task, train, minilm_tokenizer, num_tokens=2_000, seed=0)
    windows = tokens = questions = 0
    for row in np.random.default_rng(0).permutation(len(train)):
        if tokens >= 2_000:
            break
        features = tokenize_split(task, train.select([int(row)]), minilm_tokenizer, for_training=True)
        windows += len(features)
        tokens += sum(len(ids) for ids in features["input_ids"])
        questions += 1
    assert sample.num_sequences == windows and sample.num_tokens == tokens
    assert sample.num_examples == questions < windows  # a question counts once, with all its windows
    assert all({"start_positions", "end_positions"} <= set(batch) for batch in sample.batches)
    assert any(bool((batch["start_positions"] > 0).any()) for batch in sample.batches)


def test_an_example_count_draws_the_first_rows_of_the_same_permutation(char_tokenizer):
    tokenizer, train = char_tokenizer(), sentences(300)
    sample = draw_calibration_examples(TASK, train, tokenizer, num_examples=50, seed=3, batch_size=16)
    order = np.random.default_rng(3).permutation(len(train))[:50]
    assert sample.example_indices == tuple(int(row) for row in order)
    expected = [tuple(tokenizer(train[int(row)]["sentence"], truncation=True, max_length=32)["input_ids"])
                for row in order]
    assert sorted(rows_of(sample)) == sorted(expected)
    assert sample.num_examples == sample.num_sequences == 50
    widths = [batch["input_ids"].shape[1] for batch in sample.batches]
    assert widths == sorted(widths, reverse=True)
    # The token-counted draw of the same seed takes a prefix of the same order.
    by_tokens = draw_calibration_sample(TASK, train, tokenizer, num_tokens=300, seed=3, batch_size=16)
    assert by_tokens.example_indices == sample.example_indices[:by_tokens.num_examples]
    assert by_tokens.in_draw_order(4).example_indices == by_tokens.example_indices


def test_an_example_count_beyond_the_split_takes_all_of_it(char_tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        sample = draw_calibration_examples(TASK, sentences(10), char_tokenizer(), num_examples=2048, seed=0)
    assert sample.num_examples == 10 and "fewer than the 2048 asked" in caplog.text
    with pytest.raises(UserError, match="num_examples=0"):
        draw_calibration_examples(TASK, sentences(10), char_tokenizer(), num_examples=0, seed=0)


def test_squad_examples_are_questions_with_all_their_windows(shared_dir, minilm_tokenizer):
    task = dataclasses.replace(get_task("squad"), max_length=96, extra={"doc_stride": 32})
    train = read_squad_json(shared_dir / "data/squad/dev-v1.1.json").select(range(200))
    sample = draw_calibration_examples(task, train, minilm_tokenizer, num_examples=30, seed=0)
    order = np.random.default_rng(0).permutation(len(train))[:30]
    windows = len(tokenize_split(task, train.select(order), minilm_tokenizer, for_training=True))
    assert sample.num_examples == 30 and sample.num_sequences == windows > 30
