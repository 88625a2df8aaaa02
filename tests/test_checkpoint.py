"""Pruned checkpoints: saved atomically, smaller, and loaded back (stock transformers or load_model) exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, make_tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, BertTokenizer

from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.checkpoint import ReloadMismatch, check_reload, save_pruned
from kprune_cli.models.loading import load_model
from kprune_cli.models.masks import Masks
from kprune_cli.models.slicing import prune_physically
from kprune_cli.tasks.spec import get_task

QKV_NAMES = {"bert": "attention.self.query", "distilbert": "attention.q_lin"}


@pytest.fixture
def tokenizer(tmp_path) -> BertTokenizer:
    """A word-level BERT tokenizer over a 100-entry vocabulary (the tiny models' vocab size)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    folder = tmp_path / "vocab"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer.from_pretrained(folder)


def pruned_model(model) -> tuple[torch.nn.Module, list[dict[str, int]]]:
    """``model`` pruned in place: layer 0 loses its attention, layer 1 keeps 2 heads and scaled neurons."""
    adapter = get_adapter(model)
    masks = Masks.ones(adapter)
    masks.heads[0].zero_()
    masks.heads[1][::2] = 0
    masks.neurons[0][1::3] = 0
    masks.neurons[1][::2] = 0.75
    masks.neurons[1][1::4] = 0
    prune_physically(adapter, masks)
    return model, masks.kept()


def outputs(model, inputs) -> torch.Tensor:
    """Last hidden states and task outputs of ``model``, flattened into one vector."""
    with torch.no_grad():
        result = model(**inputs, output_hidden_states=True)
    task = result.logits if "logits" in result else torch.stack([result.start_logits, result.end_logits], -1)
    return torch.cat([result.hidden_states[-1].flatten(), task.flatten()])


def weights_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def tensor_names(directory: Path) -> set[str]:
    with safe_open(directory / "model.safetensors", framework="pt") as weights:
        return set(weights.keys())


@pytest.mark.parametrize("head", ["classification", "qa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_stock_transformers_and_load_model(family, head, tiny_model, tiny_inputs,
                                                              tokenizer, tmp_path):
    dense = tiny_model(family, head)
    save_pruned(dense, tokenizer, tmp_path / "dense")
    model, kept = pruned_model(copy.deepcopy(dense))
    directory = tmp_path / "pruned"

    size = save_pruned(model, tokenizer, directory)

    assert size == sum(path.stat().st_size for path in directory.iterdir())
    assert {"model.safetensors", "config.json", "modeling_kprune.py", "tokenizer_config.json"} <= {
        path.name for path in directory.iterdir()}
    assert weights_bytes(directory) < weights_bytes(tmp_path / "dense")
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == family and config["kprune_structure"] == kept
    qkv = QKV_NAMES["distilbert" if family == "distilbert" else "bert"]
    names = tensor_names(directory)
    assert not any(f"layer.0.{qkv}" in name for name in names)  # the emptied attention stays empty
    assert any(f"layer.1.{qkv}" in name for name in names)

    expected = outputs(model, tiny_inputs)
    auto = AutoModelForQuestionAnswering if head == "qa" else AutoModelForSequenceClassification
    stock = auto.from_pretrained(directory, trust_remote_code=True).eval()
    task = get_task("squad" if head == "qa" else "mrpc")
    loaded, loaded_tokenizer = load_model(str(directory), task)
    for reloaded in (stock, loaded):
        assert type(reloaded).__module__.endswith(".modeling_kprune")  # the pruned class
        assert get_adapter(reloaded).structure() == kept
        torch.testing.assert_close(outputs(reloaded, tiny_inputs), expected, atol=1e-5, rtol=0)
    assert loaded.dtype == torch.float32 and not loaded.training
    assert loaded_tokenizer("w1 w2")["input_ids"] == tokenizer("w1 w2")["input_ids"]


def test_half_precision_weights_leave_the_model_untouched(tiny_model, tiny_inputs, tokenizer, tmp_path):
    model, _ = pruned_model(tiny_model("bert"))
    before = copy.deepcopy(model.state_dict())
    save_pruned(model, tokenizer, tmp_path / "fp32")
    save_pruned(model, tokenizer, tmp_path / "fp16", dtype=torch.float16)

    assert weights_bytes(tmp_path / "fp16") < 0.6 * weights_bytes(tmp_path / "fp32")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], atol=0, rtol=0)
    loaded, _ = load_model(str(tmp_path / "fp16"), get_task("mrpc"))
    assert loaded.dtype == torch.float32
    attn_out = loaded.bert.encoder.layer[1].attention.output.dense.weight
    reference = model.bert.encoder.layer[1].attention.output.dense.weight
    torch.testing.assert_close(attn_out, reference.half().float(), atol=0, rtol=0)


def test_saving_replaces_an_existing_checkpoint(tiny_model, tiny_inputs, tokenizer, tmp_path):
    directory = tmp_path / "runs" / "pruned"
    save_pruned(tiny_model("bert", seed=1), tokenizer, directory)
    model, kept = pruned_model(tiny_model("bert", seed=2))

    save_pruned(model, tokenizer, directory)

    assert [path.name for path in directory.parent.iterdir()] == ["pruned"]  # no staging or retired leftovers
    loaded, _ = load_model(str(directory), get_task("mrpc"))
    assert get_adapter(loaded).structure() == kept
    torch.testing.assert_close(outputs(loaded, tiny_inputs), outputs(model, tiny_inputs), atol=1e-5, rtol=0)


def test_failed_save_leaves_no_half_checkpoint(tiny_model, tokenizer, tmp_path, monkeypatch):
    model, _ = pruned_model(tiny_model("bert"))
    old = tmp_path / "old"
    save_pruned(tiny_model("bert", seed=3), tokenizer, old)
    old_files = {path.name: path.read_bytes() for path in old.iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(model, tokenizer, tmp_path / "new")
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(model, tokenizer, old)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["old", "vocab"]
    assert {path.name: path.read_bytes() for path in old.iterdir()} == old_files


def test_loaded_pruned_checkpoint_can_be_pruned_and_saved_again(tiny_model, tiny_inputs, tokenizer, tmp_path):
    model, _ = pruned_model(tiny_model("distilbert", head="qa"))
    save_pruned(model, tokenizer, tmp_path / "once")
    loaded, _ = load_model(str(tmp_path / "once"), get_task("squad"))
    adapter = get_adapter(loaded)
    masks = Masks.ones(adapter)
    masks.heads[1][0] = 0
    masks.neurons[0][:] = 0
    prune_physically(adapter, masks)

    save_pruned(loaded, tokenizer, tmp_path / "twice")

    config = json.loads((tmp_path / "twice" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "modeling_kprune.DistilBertModel",
                                  "AutoModelForQuestionAnswering": "modeling_kprune.DistilBertForQuestionAnswering"}
    again, _ = load_model(str(tmp_path / "twice"), get_task("squad"))
    assert get_adapter(again).structure() == masks.kept() == [{"heads": 0, "neurons": 0},
                                                              {"heads": 1, "neurons": 48}]
    torch.testing.assert_close(outputs(again, tiny_inputs), outputs(loaded, tiny_inputs), atol=1e-5, rtol=0)


def test_check_reload_finds_a_checkpoint_that_is_not_the_model(tokenizer, tmp_path):
    """A saved checkpoint reloads as the model; one whose weights changed on disk is refused."""
    model = make_tiny_model("bert", num_labels=2)
    save_pruned(model, tokenizer, tmp_path / "saved")
    inputs = {"input_ids": torch.randint(5, 90, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    assert "checkpoint reloaded and compared" in check_reload(model, tmp_path / "saved", get_task("mrpc"), inputs)
    weights = load_file(tmp_path / "saved" / "model.safetensors")
    name = next(key for key in weights if key.endswith("classifier.weight"))
    weights[name] = weights[name] + 0.1
    save_file(weights, tmp_path / "saved" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ReloadMismatch, match="outputs up to"):
        check_reload(model, tmp_path / "saved", get_task("mrpc"), inputs)
