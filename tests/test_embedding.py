"""Sentence-embedding tasks (task kind ``embedding``, ``task=stsb_embed``) on tiny bare encoders: pooling as
sentence-transformers pools, labels never read, ``kprune run`` end to end, and the pruned folder loading
in sentence-transformers with the embeddings kprune evaluated."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import WORDS, kprune
from embedding_helpers import STSB_EMBED, kprune_embeddings, write_encoder, write_stsb_data

from kprune_cli.cli.run import refuse_unlabeled_task
from kprune_cli.pruners.kwon.pruner import KwonPruner
from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.calibration import draw_calibration_sample
from kprune_cli.tasks.data import load_task_data, tokenize_split
from kprune_cli.tasks.kinds import kind_of
from kprune_cli.tasks.kinds.embedding import Pooling, read_pooling
from kprune_cli.tasks.kinds.retrieval import passages
from kprune_cli.tasks.metrics import gold_ranks, mrr_at, spearmanr
from kprune_cli.tasks.spec import get_task

sentence_transformers = pytest.importorskip("sentence_transformers")
SQUAD_RETRIEVAL = get_task("squad_retrieval")
TEXTS = ["good fine day", "bad dull dark night", "nice", "great bright awful poor good fine"]


def st_embeddings(path: Path, texts: list[str]) -> torch.Tensor:
    model = sentence_transformers.SentenceTransformer(str(path), device="cpu", trust_remote_code=True)
    return model.encode(texts, convert_to_tensor=True, batch_size=2)


@pytest.mark.parametrize("mode, normalize", [("mean", True), ("mean", False), ("cls", True), ("max", False)])
def test_pooling_matches_sentence_transformers(tmp_path, mode, normalize):
    folder = write_encoder(tmp_path / "encoder", mode, normalize)
    assert read_pooling(folder) == Pooling(mode, normalize, str(folder))
    ours = kprune_embeddings(folder, TEXTS)
    torch.testing.assert_close(ours, st_embeddings(folder, TEXTS), rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS))) == normalize


def test_plain_folder_gets_mean_pooling_and_other_modules_are_refused(tmp_path):
    plain = write_encoder(tmp_path / "plain", mode=None)
    assert read_pooling(plain) == Pooling("mean", False, None)
    hidden = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(Pooling()(hidden, mask), torch.stack([hidden[0, :2].mean(0), hidden[1, 0]]))

    dense = write_encoder(tmp_path / "dense")
    modules = json.loads((dense / "modules.json").read_text())
    modules.append({"path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UserError, match="Dense"):
        read_pooling(dense)


def test_calibration_reads_no_labels_and_encodes_sentences_separately(tmp_path, char_tokenizer):
    data = load_task_data(STSB_EMBED, write_stsb_data(tmp_path / "stsb"))
    assert "label" not in data["train"].column_names
    sample = draw_calibration_sample(STSB_EMBED, data["train"], char_tokenizer(), num_tokens=200, seed=0,
                                     batch_size=8)
    assert all("labels" not in batch for batch in sample.batches)
    assert sample.num_sequences == 2 * sample.num_examples  # both sentences of a pair, each its own sequence
    labelled = data["validation"]
    features = tokenize_split(STSB_EMBED, labelled, char_tokenizer(), for_training=True)
    assert "labels" not in features.column_names and len(features) == 2 * len(labelled)


def test_kwon_is_refused_on_an_embedding_task():
    with pytest.raises(UserError, match="needs gold labels.*stsb_embed"):
        refuse_unlabeled_task(KwonPruner(), "kwon", STSB_EMBED)
    refuse_unlabeled_task(KwonPruner(), "kwon", get_task("stsb"))  # a labelled task passes


@pytest.mark.parametrize("pruner", ["kprune", "magnitude"])
def test_run_stsb_embed_writes_a_sentence_transformers_folder(tmp_path, pruner):
    encoder = write_encoder(tmp_path / "encoder")
    data = write_stsb_data(tmp_path / "stsb")
    output = tmp_path / "out"
    assert kprune("run", "task=stsb_embed", f"model.path={encoder}", f"data_dir={data}", f"output_dir={output}",
                  f"pruner={pruner}", "rate=0.5", "calibration.num_tokens=300", "calibration.batch_size=8",
                  "device=cpu") == 0
    report = json.loads((output / "report.json").read_text())
    assert report["task"] == "stsb_embed" and set(report["metric"]["all"]["pruned"]) == {"pearson", "spearmanr"}
    assert report["params"]["pruned"] < report["params"]["dense"]

    pruned = Path(report["checkpoint"]["path"])
    assert (pruned / "modules.json").is_file() and (pruned / "2_Normalize").is_dir()
    validation = pd.read_parquet(data / "validation" / "0000.parquet")
    texts = [text for pair in zip(validation["sentence1"], validation["sentence2"]) for text in pair]
    ours = kprune_embeddings(pruned, texts)
    theirs = st_embeddings(pruned, texts)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    first, second = theirs[0::2].double(), theirs[1::2].double()
    similarity = torch.nn.functional.cosine_similarity(first, second, dim=-1).numpy()
    assert spearmanr(similarity, validation["label"]) == pytest.approx(report["metric"]["all"]["pruned"]["spearmanr"],
                                                                      abs=1e-6)
    assert not np.allclose(ours.numpy(), kprune_embeddings(encoder, texts).numpy())  # it was pruned


def test_retrieval_ranks_and_metrics():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.4, 0.4, 0.1]])  # (queries, passages)
    ranks = gold_ranks(scores, [0, 0, 1])
    assert ranks.tolist() == [1, 3, 1]  # a tie with the gold passage does not rank before it
    metrics = kind_of(SQUAD_RETRIEVAL).metrics(SQUAD_RETRIEVAL, scores, [0, 0, 1])
    assert metrics == {"recall_at_1": pytest.approx(2 / 3), "recall_at_10": 1.0,
                       "mrr_at_10": pytest.approx((1 + 1 / 3 + 1) / 3)}


def write_squad_dev(directory: Path, articles: int = 6) -> Path:
    """A tiny ``dev-v1.1.json`` alone: ``articles`` articles of two paragraphs with three questions each."""
    rng = random.Random(1)
    data = []
    for article in range(articles):
        paragraphs = []
        for paragraph in range(2):
            context = " ".join(rng.choice(WORDS) for _ in range(10))
            qas = [{"id": f"{article}-{paragraph}-{number}", "question": " ".join(rng.choice(WORDS) for _ in range(3)),
                    "answers": [{"text": context.split()[0], "answer_start": 0}]} for number in range(3)]
            paragraphs.append({"context": context, "qas": qas})
        data.append({"title": f"a{article}", "paragraphs": paragraphs})
    directory.mkdir(parents=True)
    (directory / "dev-v1.1.json").write_text(json.dumps({"version": "1.1", "data": data}))
    return directory


def test_run_squad_retrieval_on_held_out_articles(tmp_path):
    encoder = write_encoder(tmp_path / "encoder")
    data = write_squad_dev(tmp_path / "squad")
    output = tmp_path / "out"
    assert kprune("run", "task=squad_retrieval", f"model.path={encoder}", f"data_dir={data}", f"output_dir={output}",
                  "pruner=kprune", "rate=0.5", "calibration.num_tokens=300", "calibration.batch_size=8",
                  "device=cpu") == 0
    report = json.loads((output / "report.json").read_text())
    assert set(report["metric"]["all"]["pruned"]) == {"recall_at_1", "recall_at_10", "mrr_at_10"}
    assert any("split by article" in note for note in report["notes"])
    assert report["sample"]["windows"] == 2 * report["sample"]["examples"]  # each row's question and paragraph

    held_out = load_task_data(SQUAD_RETRIEVAL, data)["validation"]  # articles 3-5: 18 questions, 6 paragraphs
    corpus, gold = passages(list(held_out["context"]))
    assert len(held_out) == 18 and len(corpus) == 6
    model = sentence_transformers.SentenceTransformer(report["checkpoint"]["path"], device="cpu",
                                                      trust_remote_code=True)
    queries = model.encode(list(held_out["question"]), normalize_embeddings=True)
    passages_ = model.encode(corpus, normalize_embeddings=True)
    scores = queries.astype(np.float64) @ passages_.astype(np.float64).T  # (18, 6)
    # A random tiny encoder gives near-ties that float round-off may order either way: the reported MRR
    # lies between those of the ranks with every near-tie lost and with every near-tie won.
    gold_scores = scores[np.arange(len(gold)), gold][:, None]
    lost = (scores > gold_scores - 1e-5).sum(axis=1)  # the gold passage itself counts once
    won = 1 + (scores > gold_scores + 1e-5).sum(axis=1)
    assert (won == gold_ranks(scores, gold)).mean() > 0.5
    assert mrr_at(lost, 10) - 1e-9 <= report["metric"]["all"]["pruned"]["mrr_at_10"] <= mrr_at(won, 10) + 1e-9
    assert mrr_at(won, 10) - mrr_at(lost, 10) < 0.2  # the bounds say something
