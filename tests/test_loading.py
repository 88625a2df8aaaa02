"""Model loading: float32 task models, fresh heads for fine-tuning, one clear UserError per user mistake."""

from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, BertModel, BertTokenizer, GPT2Config, GPT2ForSequenceClassification

from kprune_cli.models.loading import (
    _load_weights,
    count_parameters,
    load_for_finetuning,
    load_model,
    locate_model,
    stored_dtype,
)
from kprune_cli.runtime.device import resolve_device
from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.spec import get_task

MRPC, STSB, SQUAD = get_task("mrpc"), get_task("stsb"), get_task("squad")


@pytest.fixture
def tokenizer(tmp_path) -> BertTokenizer:
    """A word-level BERT tokenizer over a 100-entry vocabulary (the tiny models' vocab size)."""
    folder = tmp_path / "vocab"
    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer.from_pretrained(folder)


@pytest.fixture
def save(tmp_path, tokenizer):
    """``save(model, name)``: a model directory with weights, config and tokenizer."""

    def _save(model, name: str = "model") -> Path:
        directory = tmp_path / name
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        return directory

    return _save


def test_loads_task_model_in_float32_eval_mode(tiny_model, tiny_inputs, save):
    model = tiny_model("bert")
    directory = save(model.half())

    loaded, tokenizer = load_model(str(directory), MRPC)

    assert loaded.dtype == torch.float32 and not loaded.training
    assert loaded.config.num_labels == 2
    with torch.no_grad():
        expected = model.float()(**tiny_inputs).logits
        torch.testing.assert_close(loaded(**tiny_inputs).logits, expected, atol=1e-5, rtol=0)
    assert tokenizer("w3 w4")["input_ids"] == [2, 8, 9, 3]


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError, match="no-such-model.*does not exist"):
        load_model(str(missing), MRPC)


def test_unreachable_hub_id(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network call
    with pytest.raises(UserError, match="'someorg/no-such-model'.*hub.*local model directory"):
        load_model("someorg/no-such-model", MRPC)


def test_file_instead_of_directory(tiny_model, save):
    config = save(tiny_model("bert")) / "config.json"
    with pytest.raises(UserError, match="config.json' is a file"):
        load_model(str(config), MRPC)


def test_directory_without_weights(tiny_model, save):
    directory = save(tiny_model("bert"))
    (directory / "model.safetensors").unlink()
    with pytest.raises(UserError, match=f"{directory}.*no weights"):
        load_model(str(directory), MRPC)


def test_truncated_safetensors(tiny_model, save):
    directory = save(tiny_model("bert"))
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=f"{directory}.*corrupted or truncated"):
        load_model(str(directory), MRPC)


def test_checkpoint_missing_head_weights(tiny_model, save):
    directory = save(tiny_model("bert"))
    weights = directory / "model.safetensors"
    tensors = {name: t for name, t in load_file(weights).items() if not name.startswith("classifier.")}
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"{directory}.*lacks weights for classifier.bias"):
        load_model(str(directory), MRPC)


def test_missing_tokenizer(tiny_model, tmp_path):
    directory = tmp_path / "model"
    tiny_model("bert").save_pretrained(directory)
    with pytest.raises(UserError, match=f"{directory}.*no tokenizer"):
        load_model(str(directory), MRPC)


def test_a_deberta_sentencepiece_file_counts_as_a_tokenizer(tiny_model, tmp_path):
    """DeBERTa-v2/v3 checkpoints ship their vocabulary as spm.model (and often nothing else)."""
    directory = tmp_path / "model"
    tiny_model("bert").save_pretrained(directory)
    (directory / "spm.model").write_bytes(b"sentencepiece")
    assert locate_model(str(directory)) == str(directory)


def test_qa_model_for_glue_task(tiny_model, save):
    directory = save(tiny_model("bert", head="qa"))
    with pytest.raises(UserError, match="BertForQuestionAnswering.*'mrpc'.*ForSequenceClassification"):
        load_model(str(directory), MRPC)


def test_classification_model_for_qa_task(tiny_model, save):
    directory = save(tiny_model("distilbert"))
    with pytest.raises(UserError, match="DistilBertForSequenceClassification.*'squad'.*ForQuestionAnswering"):
        load_model(str(directory), SQUAD)


def test_wrong_number_of_labels(tiny_model, save):
    directory = save(tiny_model("roberta", num_labels=3))
    with pytest.raises(UserError, match="3 output labels.*'mrpc' needs 2"):
        load_model(str(directory), MRPC)


def test_unsupported_architecture(save):
    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=2)
    directory = save(GPT2ForSequenceClassification(config))
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'.*bert, roberta"):
        load_model(str(directory), MRPC)


def test_base_encoder_needs_finetuning_first(save):
    directory = save(BertModel(tiny_config("bert")))
    with pytest.raises(UserError, match="BertModel.*kprune finetune"):
        load_model(str(directory), MRPC)


def test_finetuning_gets_a_fresh_regression_head_quietly(save, caplog):
    encoder = BertModel(tiny_config("bert"))
    directory = save(encoder)

    with caplog.at_level(logging.INFO):
        model, _ = load_for_finetuning(str(directory), STSB)

    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    assert model.classifier.out_features == 1
    assert model.dtype == torch.float32
    torch.testing.assert_close(model.bert.encoder.layer[1].output.dense.weight,
                               encoder.encoder.layer[1].output.dense.weight, atol=0, rtol=0)
    assert not any("newly initialized" in record.getMessage() or "MISSING" in record.getMessage()
                   for record in caplog.records)


def test_finetuning_replaces_a_head_of_another_task(tiny_model, save):
    classifier = tiny_model("bert")
    directory = save(classifier)

    model, _ = load_for_finetuning(str(directory), get_task("mnli"))
    assert model.classifier.out_features == 3 and model.config.num_labels == 3
    qa_model, _ = load_for_finetuning(str(directory), SQUAD)
    assert qa_model.qa_outputs.out_features == 2
    torch.testing.assert_close(qa_model.bert.embeddings.word_embeddings.weight,
                               classifier.bert.embeddings.word_embeddings.weight, atol=0, rtol=0)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="'tpu'.*auto\\|cpu\\|cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_cuda(name):
    with pytest.raises(UserError, match=f"'{name}'.*not available"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["cuda:", "cuda:x", "cuda:-1", "cuda 1"])
def test_malformed_cuda_device_is_refused(name):
    with pytest.raises(UserError, match="unknown device.*cuda:N"):
        resolve_device(name)


def test_cuda_index_is_checked_against_the_gpus_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="'cuda:2'.*2 GPUs.*cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_count_parameters(tiny_model):
    d, ffn, vocab, positions, types, labels = 32, 64, 100, 64, 2, 2
    embeddings = (vocab + positions + types) * d + 2 * d
    layer = 4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 2 * 2 * d
    head = (d * d + d) + (d * labels + labels)  # pooler + classifier
    assert count_parameters(tiny_model("bert")) == embeddings + 2 * layer + head


def test_real_finetuned_minilm(shared_dir):
    model, tokenizer = load_model(str(shared_dir / "models" / "minilm-mrpc"), MRPC)
    assert model.dtype == torch.float32 and not model.training
    assert model.config.num_labels == 2 and model.config.num_hidden_layers == 6
    inputs = tokenizer("The cat sat on the mat.", "A cat was sitting on the mat.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_stored_dtype(tiny_model, save):
    assert stored_dtype(str(save(tiny_model("bert").half(), "half"))) == torch.float16
    assert stored_dtype(str(save(tiny_model("bert"), "full"))) == torch.float32


@pytest.mark.parametrize("family, attention", [("bert", "sdpa"), ("modernbert", "sdpa"), ("mpnet", "eager")])
def test_weights_load_with_sdpa_where_the_family_has_it(tiny_model, tmp_path, family, attention):
    tiny_model(family).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    config.reference_compile = True  # transformers 4.5x's ModernBERT default on CUDA: compile the MLP
    model = _load_weights(str(tmp_path), str(tmp_path), MRPC, config)
    assert model.config._attn_implementation == attention
    assert model.config.reference_compile is False
