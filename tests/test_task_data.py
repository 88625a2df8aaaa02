"""Loading task splits from the hub and local files, GLUE tokenisation, batch padding."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset

from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks import data as task_data
from kprune_cli.tasks.batches import FeatureBatches
from kprune_cli.tasks.data import feature_lengths, load_task_data, tokenize_split
from kprune_cli.tasks.spec import get_task

DEMO = get_task("demo")  # columns sentence, label
STSB = get_task("stsb")  # columns sentence1, sentence2, label (float)


def write_csv(path, rows: list[dict], sep: str = ",") -> None:
    pd.DataFrame(rows).to_csv(path, sep=sep, index=False)


def rows(count: int, start: int = 0) -> list[dict]:
    return [{"sentence": f"sentence number {i}", "label": i % 2} for i in range(start, start + count)]


def test_real_glue_parquet_layout(shared_dir):
    data = load_task_data(get_task("mrpc"), shared_dir / "data/glue/mrpc")
    assert list(data) == ["train", "validation"]
    assert (len(data["train"]), len(data["validation"])) == (3668, 408)
    assert {"sentence1", "sentence2", "label"} <= set(data["validation"].column_names)
    assert data.notes == []


def test_data_files_and_eval_only_splits(shared_dir):
    validation = str(shared_dir / "data/glue/sst2/validation/0000.parquet")
    data = load_task_data(get_task("sst2"), data_files={"validation": validation}, splits=("validation",))
    assert list(data) == ["validation"] and len(data["validation"]) == 872
    with pytest.raises(UserError, match="no data files for split 'train'"):
        load_task_data(get_task("sst2"), data_files={"validation": validation})


def test_flat_csv_files_and_dev_alias(tmp_path):
    write_csv(tmp_path / "train.csv", rows(5))
    write_csv(tmp_path / "dev.csv", rows(3, start=100))
    data = load_task_data(DEMO, str(tmp_path))
    assert len(data["train"]) == 5
    assert data["validation"]["sentence"] == [f"sentence number {i}" for i in (100, 101, 102)]
    assert data["validation"]["label"] == [0, 1, 0]


def test_tsv_keeps_quote_characters(tmp_path):
    # GLUE's TSVs contain unbalanced quotes; they must be read verbatim.
    text = '" a quote opens this sentence and "another" follows'
    (tmp_path / "train.tsv").write_text(f"sentence\tlabel\n{text}\t1\nplain\t0\n")
    (tmp_path / "validation.tsv").write_text("sentence\tlabel\nplain\t0\n")
    data = load_task_data(DEMO, tmp_path)
    assert data["train"]["sentence"] == [text, "plain"] and data["train"]["label"] == [1, 0]


def test_jsonl_folders_and_hub_shard_names(tmp_path):
    (tmp_path / "train").mkdir()
    for shard in range(2):
        lines = [json.dumps({"sentence1": f"a {i}", "sentence2": f"b {i}", "label": i / 2}) for i in range(3)]
        (tmp_path / "train" / f"part{shard}.jsonl").write_text("\n".join(lines) + "\n")
    pd.DataFrame([{"sentence1": "x", "sentence2": "y", "label": 4.5}]).to_parquet(
        tmp_path / "validation-00000-of-00001.parquet")
    data = load_task_data(STSB, tmp_path)
    assert len(data["train"]) == 6 and data["validation"]["label"] == [4.5]


def test_mnli_split_names(tmp_path):
    mnli = get_task("mnli")
    for split in ("train", "validation_matched", "validation_mismatched"):
        write_csv(tmp_path / f"{split}.csv", [{"premise": f"p {split}", "hypothesis": "h", "label": 2}])
    data = load_task_data(mnli, tmp_path)
    assert list(data) == ["train", "validation_matched", "validation_mismatched"]
    assert data["validation_mismatched"]["premise"] == ["p validation_mismatched"]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        load_task_data(DEMO, tmp_path / "missing")
    write_csv(tmp_path / "train.csv", rows(2))
    with pytest.raises(UserError, match="no data files for split 'validation'"):
        load_task_data(DEMO, tmp_path)
    (tmp_path / "validation.csv").write_text("sentence,label\n")
    with pytest.raises(UserError, match="'validation' .* is empty"):
        load_task_data(DEMO, tmp_path)
    (tmp_path / "validation.csv").unlink()
    pd.DataFrame({"sentence": pd.Series([], dtype=str), "label": pd.Series([], dtype=int)}).to_parquet(
        tmp_path / "validation.parquet")
    with pytest.raises(UserError, match="'validation' .* is empty"):
        load_task_data(DEMO, tmp_path)
    (tmp_path / "validation.parquet").unlink()
    write_csv(tmp_path / "validation.csv", [{"text": "x", "label": 0}])
    with pytest.raises(UserError, match="lacks column.*sentence"):
        load_task_data(DEMO, tmp_path)
    with pytest.raises(UserError, match="split 'test'"):
        load_task_data(DEMO, data_files={"test": str(tmp_path / "train.csv")})
    with pytest.raises(UserError, match="split 'test'"):
        load_task_data(DEMO, tmp_path, splits=("test",))
    with pytest.raises(UserError, match="does not exist"):
        load_task_data(DEMO, data_files={"train": str(tmp_path / "nope.csv")})
    with pytest.raises(UserError, match="not both"):
        load_task_data(DEMO, tmp_path, data_files={"train": str(tmp_path / "train.csv")})


def test_unreachable_hub_is_a_user_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(task_data, "load_dataset", offline)
    with pytest.raises(UserError, match="unreachable.*data_dir"):
        load_task_data(get_task("mrpc"))


def test_glue_tokenisation_truncates_and_keeps_labels(minilm_tokenizer, shared_dir):
    task = dataclasses.replace(get_task("mrpc"), max_length=32)
    validation = load_task_data(task, shared_dir / "data/glue/mrpc", splits=("validation",))["validation"]
    features = tokenize_split(task, validation.select(range(50)), minilm_tokenizer, for_training=False)
    assert set(features.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert features["labels"] == validation["label"][:50]
    assert feature_lengths(features).max() == 32  # MRPC pairs are longer than 32 tokens
    first = minilm_tokenizer(validation[0]["sentence1"], validation[0]["sentence2"], truncation=True, max_length=32)
    assert features[0]["input_ids"] == first["input_ids"]
    assert features[0]["input_ids"].count(minilm_tokenizer.sep_token_id) == 2  # a pair


def test_regression_labels_are_float_and_segment_ids_optional(char_tokenizer, tmp_path):
    write_csv(tmp_path / "train.csv", [{"sentence1": "a b", "sentence2": "c", "label": 3}])
    (tmp_path / "validation.csv").write_text((tmp_path / "train.csv").read_text())
    train = load_task_data(STSB, tmp_path)["train"]
    features = tokenize_split(STSB, train, char_tokenizer(token_type_ids=False), for_training=True)
    assert "token_type_ids" not in features.column_names
    batch = FeatureBatches(features, char_tokenizer(token_type_ids=False)).batch([0])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [3.0]


def test_batches_pad_the_rows_asked_for_to_the_longest_one(char_tokenizer):
    tokenizer = char_tokenizer()
    rows = [dict(tokenizer(text), labels=label, example_id="x") for text, label in (("abc", 1), ("a", 0), ("ab", 1))]
    batches = FeatureBatches(Dataset.from_list(rows), tokenizer)
    batch = batches.batch([1, 0])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 5) and batch["labels"].tolist() == [0, 1]
    assert batch["input_ids"][0].tolist() == rows[1]["input_ids"] + [tokenizer.pad_token_id] * 2
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert all(tensor.dtype == torch.int64 for tensor in batch.values())
    assert batches.batch([1])["input_ids"].shape == (1, 3)  # a batch is as long as its own longest row


@pytest.mark.parametrize("token_type_ids", [True, False])
def test_batches_equal_padding_the_rows_one_by_one(char_tokenizer, token_type_ids):
    """Random lengths, float targets, a dataset seen through select (an indices mapping): every
    batch is the rows padded by hand."""
    tokenizer = char_tokenizer(token_type_ids=token_type_ids)
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcdef"), size=int(size))) for size in rng.integers(1, 20, 40)]
    rows = [dict(tokenizer(text), labels=float(rng.random()), offset_mapping=[[0, 1]]) for text in texts]
    features = Dataset.from_list(rows).select(rng.permutation(40)[:25])
    batches = FeatureBatches(features, tokenizer)
    assert batches.lengths.tolist() == feature_lengths(features).tolist()
    pads = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": tokenizer.pad_token_type_id}
    for picked in ([3, 0, 17, 5], [24], list(range(25))):
        batch, chosen = batches.batch(picked), [features[index] for index in picked]
        width = max(len(row["input_ids"]) for row in chosen)
        assert set(batch) == {*pads, "labels"} - ({"token_type_ids"} if not token_type_ids else set())
        for key in set(batch) - {"labels"}:
            expected = [row[key] + [pads[key]] * (width - len(row[key])) for row in chosen]
            assert batch[key].tolist() == expected, key
        assert batch["labels"].dtype == torch.float32
        assert batch["labels"].tolist() == pytest.approx([row["labels"] for row in chosen])
