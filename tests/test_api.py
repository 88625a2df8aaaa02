"""The Python API (docs/python-api.md): the same masks and weights as ``kprune run`` with the same
settings, calibration from a list of texts, one-line errors, a light package root, and the
documented example runs as written."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kprune
from datasets import Dataset
from embedding_helpers import kprune_embeddings, write_encoder, write_stsb_data
from safetensors.torch import load_file
from test_cli import run_args
from transformers import AutoModel, AutoTokenizer

import kprune_cli
from kprune_cli import PruneOutcome, prune, save_pruned
from kprune_cli.models.loading import load_model
from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.kinds.embedding import EMBEDDING_OUTPUT, Pooling, pooling_of
from kprune_cli.tasks.spec import get_task

REPO = Path(__file__).resolve().parents[1]
MRPC = get_task("mrpc")


def _model(checkpoint: Path):
    return load_model(str(checkpoint), MRPC, "cpu")


@pytest.mark.parametrize("pruner", ["kprune", "kwon"])
def test_api_gives_the_masks_and_weights_of_kprune_run(pruner, tiny_checkpoint, mrpc_dir, tmp_path):
    output = tmp_path / "run"
    args = run_args(tiny_checkpoint, mrpc_dir, output, f"pruner={pruner}", "calibration.num_examples=null")
    assert kprune(*args) == 0
    report = json.loads((output / "report.json").read_text())
    model, tokenizer = _model(tiny_checkpoint)
    outcome = prune(model, tokenizer, task="mrpc", rate=0.5, calibration=Dataset.from_csv(str(mrpc_dir / "train.csv")),
                    pruner=pruner, num_tokens=300, calibration_batch_size=8, device="cpu")
    assert isinstance(outcome, PruneOutcome) and outcome.model is model
    for key in ("layers", "dense_layers", "flops", "params", "sample", "pruner_settings"):
        assert outcome.report[key] == report[key], key
    assert [int((mask != 0).sum()) for mask in outcome.masks.heads] == [layer["heads"] for layer in report["layers"]]
    saved = load_file(output / "pruned" / "model.safetensors")
    state = outcome.model.state_dict()
    assert saved.keys() <= state.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, state[name]), name
    written = save_pruned(outcome, tmp_path / "api")
    assert json.loads((written / "kprune_report.json").read_text())["layers"] == report["layers"]
    assert load_file(written / "model.safetensors").keys() == saved.keys()


def test_calibration_from_a_list_of_texts_or_a_file(tiny_checkpoint, mrpc_dir, tmp_path):
    train = Dataset.from_csv(str(mrpc_dir / "train.csv"))
    texts = [f"{row['sentence1']}\t{row['sentence2']}" for row in train]
    outcomes = []
    for calibration in (train, texts):
        model, tokenizer = _model(tiny_checkpoint)
        outcomes.append(prune(model, tokenizer, "mrpc", 0.5, calibration, num_tokens=300, device="cpu"))
    from_rows, from_texts = outcomes
    assert from_texts.report["sample"] == from_rows.report["sample"]  # the same rows, drawn alike
    for got, want in zip(from_texts.masks.heads + from_texts.masks.neurons,
                         from_rows.masks.heads + from_rows.masks.neurons):
        assert torch.equal(got, want)  # K-prune reads no labels
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    model, tokenizer = _model(tiny_checkpoint)
    from_file = prune(model, tokenizer, "mrpc", 0.5, tmp_path / "texts.txt", num_tokens=300, device="cpu")
    assert from_file.report["layers"] == from_rows.report["layers"]
    with pytest.raises(UserError, match="needs labelled calibration data"):
        prune(*_model(tiny_checkpoint), "mrpc", 0.5, texts, pruner="kwon", device="cpu")


def test_api_prunes_a_sentence_embedding_model_as_kprune_run(tmp_path):
    """A bare encoder loaded with AutoModel: its pooling is read from its folder, the masks are
    ``kprune run``'s, and the saved folder embeds as the pruned model in memory."""
    encoder = write_encoder(tmp_path / "encoder", "cls", normalize=True)
    data = write_stsb_data(tmp_path / "stsb")
    assert kprune("run", "task=stsb_embed", f"model.path={encoder}", f"data_dir={data}", "rate=0.5",
                  "calibration.num_tokens=300", "calibration.batch_size=8", "device=cpu",
                  f"output_dir={tmp_path / 'run'}") == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    train = Dataset.from_parquet(str(data / "train" / "0000.parquet"))
    model, tokenizer = AutoModel.from_pretrained(encoder), AutoTokenizer.from_pretrained(encoder)
    # The API measures the FLOPs model's S on the calibration rows (it has no dev split): given run's S, the same masks.
    task = dataclasses.replace(get_task("stsb_embed"), avg_seq_len=report["flops"]["seq_len"])
    outcome = prune(model, tokenizer, task=task, rate=0.5, calibration=train, num_tokens=300,
                    calibration_batch_size=8, device="cpu")
    assert pooling_of(outcome.model) == Pooling("cls", True, str(encoder))
    for key in ("sample", "flops", "layers"):
        assert outcome.report[key] == report[key], key

    written = save_pruned(outcome, tmp_path / "api")
    assert (written / "modules.json").is_file() and (written / "2_Normalize").is_dir()
    texts = ["good fine day", "bad dull dark night", "nice"]
    with torch.inference_mode():
        expected = outcome.model(**tokenizer(texts, padding=True, return_tensors="pt"))[EMBEDDING_OUTPUT]
    torch.testing.assert_close(kprune_embeddings(written, texts), expected)

    texts = [" ".join(row.values()) for row in train.select(range(10))]
    from_texts = prune(AutoModel.from_pretrained(encoder), tokenizer, "stsb_embed", 0.5, texts, num_tokens=100,
                       device="cpu")
    assert from_texts.report["sample"]["windows"] == from_texts.report["sample"]["examples"]  # one text each


@pytest.mark.parametrize("changes, message", [
    ({"rate": 1.5}, r"rate=1\.5 is out of range"),
    ({"rate": "half"}, r"rate='half' is not a number"),
    ({"pruner": "kprunee"}, r"pruner='kprunee' is not a pruner: choose one of .*kprune, "),
    ({"task": "mrcp"}, r"mrcp"),
    ({"calibration": []}, r"calibration=list: give a datasets.Dataset"),
    ({"calibration": ["", " "]}, r"calibration texts hold no examples"),
    ({"num_tokens": 0}, r"num_tokens=0"),
])
def test_a_bad_argument_is_one_user_error(changes, message, tiny_checkpoint):
    model, tokenizer = _model(tiny_checkpoint)
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    arguments = {"task": "mrpc", "rate": 0.5, "calibration": ["a b\tc d"], "device": "cpu", **changes}
    with pytest.raises(UserError, match=message):
        prune(model, tokenizer, **arguments)
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())  # untouched


def test_importing_the_package_loads_no_torch():
    # Only the lazy import needs a fresh process; that the names then load is checked here (a fresh
    # process importing torch and transformers would take seconds).
    code = "import sys, kprune_cli; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
    assert callable(kprune_cli.prune)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kprune_cli.nope  # noqa: B018


def test_the_documented_example_runs(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    text = (REPO / "docs" / "python-api.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    output = tmp_path / "pruned"
    namespace = {"MODEL": str(tiny_checkpoint), "DATA": str(mrpc_dir), "OUTPUT": str(output)}
    exec(compile(example, "docs/python-api.md", "exec"), namespace)  # noqa: S102
    outcome, reloaded = namespace["outcome"], namespace["reloaded"]  # the second prune's outcome, reloaded
    printed = capsys.readouterr().out.split()  # the first prune's FLOPs reduction and layers
    assert 0.3 < float(printed[0]) < 0.7 and printed[1].startswith("[{'heads':")
    assert 0.3 < outcome.report["flops"]["reduction"] < 0.7
    assert sum(parameter.numel() for parameter in reloaded.parameters()) == outcome.report["params"]["pruned"]
    assert json.loads((output / "kprune_report.json").read_text())["layers"] == outcome.report["layers"]
