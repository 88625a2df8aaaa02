"""Tiny sentence-embedding models and STS-B-shaped data for the tests of embedding tasks, their export,
bench and Python API."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import torch
from conftest import WORDS, make_char_tokenizer, tiny_config
from datasets import Dataset
from transformers import AutoModel

from kprune_cli.models.loading import load_model
from kprune_cli.tasks.batches import FeatureBatches
from kprune_cli.tasks.kinds import kind_of
from kprune_cli.tasks.kinds.embedding import EMBEDDING_OUTPUT
from kprune_cli.tasks.spec import get_task

STSB_EMBED = get_task("stsb_embed")


def write_encoder(directory: Path, mode: str | None = "mean", normalize: bool = True, seed: int = 0) -> Path:
    """A tiny bare BERT encoder with a character tokenizer; with ``mode``, sentence-transformers files
    written by hand (``modules.json``, ``1_Pooling/config.json``, ``2_Normalize``) pooling that way."""
    torch.manual_seed(seed)
    AutoModel.from_config(tiny_config("bert")).save_pretrained(directory)
    make_char_tokenizer().save_pretrained(directory)
    if mode is None:
        return directory
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (directory / "2_Normalize").mkdir()
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean", "pooling_mode_max_tokens": mode == "max"}))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48, "do_lower_case": False}))
    return directory


def write_stsb_data(directory: Path, train_rows: int = 40, validation_rows: int = 24) -> Path:
    """STS-B-shaped parquet data: a train split of sentence pairs *without* a label column, a validation
    split with gold scores."""
    rng = random.Random(0)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))

    for split, rows in (("train", train_rows), ("validation", validation_rows)):
        frame = pd.DataFrame({"sentence1": [sentence() for _ in range(rows)],
                              "sentence2": [sentence() for _ in range(rows)]})
        if split == "validation":
            frame["label"] = [rng.uniform(0, 5) for _ in range(rows)]
        (directory / split).mkdir(parents=True)
        frame.to_parquet(directory / split / "0000.parquet")
    return directory


def kprune_embeddings(path: Path, texts: list[str]) -> torch.Tensor:
    """``(texts, d)``: the embeddings kprune computes (load_model for stsb_embed, the kind's features)."""
    model, tokenizer = load_model(str(path), STSB_EMBED)
    features = kind_of(STSB_EMBED).tokenize(STSB_EMBED, Dataset.from_dict({"sentence1": texts}), tokenizer, 48,
                                           for_training=False)
    with torch.inference_mode():
        return model(**FeatureBatches(features, tokenizer).batch(range(len(features))))[EMBEDDING_OUTPUT]
