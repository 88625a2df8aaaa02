"""ONNX export of dense and pruned checkpoints, checked against PyTorch on ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, kprune, make_tiny_model
from embedding_helpers import kprune_embeddings, write_encoder, write_stsb_data
from transformers import AutoTokenizer

from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.masks import Masks
from kprune_cli.models.slicing import prune_physically

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from kprune_cli.deploy.onnx_model import (  # noqa: E402  (after the skips: needs the .[deploy] extra)
    MATCH_TOLERANCE,
    example_inputs,
    export_onnx,
    onnx_difference,
    ort_session,
    run_session,
)


def prune_with_empty_sublayers(model: torch.nn.Module) -> list[dict[str, int]]:
    """Layer 0 loses its attention, layer 1 its FFN; the other sub-layers keep some units."""
    adapter = get_adapter(model)
    masks = Masks.ones(adapter)
    masks.heads[0].zero_()
    masks.heads[1][::2] = 0
    masks.neurons[0][1::3] = 0
    masks.neurons[1].zero_()
    prune_physically(adapter, masks)
    return adapter.structure()


@pytest.mark.parametrize("family, head", [*((family, "classification") for family in FAMILIES), ("bert", "qa")])
def test_pruned_model_exports_with_dynamic_axes_and_matches_pytorch(family, head, tmp_path):
    model = make_tiny_model(family, head).eval()
    structure = prune_with_empty_sublayers(model)
    assert structure[0]["heads"] == 0 and structure[1]["neurons"] == 0
    export_onnx(model, tmp_path / "model.onnx")
    graph = onnx.load(tmp_path / "model.onnx").graph
    for tensor in graph.input:
        assert [dim.dim_param for dim in tensor.type.tensor_type.shape.dim] == ["batch", "sequence"]
    session = ort_session(tmp_path / "model.onnx", threads=1)
    for batch, tokens in ((1, 5), (3, 33)):  # neither is the traced shape
        assert onnx_difference(model, session, example_inputs(model, batch, tokens, seed=batch)) <= MATCH_TOLERANCE


def test_export_command_writes_model_tokenizer_and_summary(tiny_checkpoint, tmp_path, capsys):
    output = tmp_path / "onnx"
    assert kprune("export", f"checkpoint={tiny_checkpoint}", "task=mrpc", f"output_dir={output}") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"model.onnx", "export.json", "tokenizer_config.json"} <= {path.name for path in output.iterdir()}
    assert printed["max_abs_difference"] <= MATCH_TOLERANCE and printed["outputs"] == ["logits"]
    assert not list(tmp_path.glob(".onnx.*"))  # no staging directory left
    assert kprune("export", f"checkpoint={tiny_checkpoint}", "task=mrpc", f"output_dir={output}") == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert kprune("export", f"checkpoint={tiny_checkpoint}", "task=mrpc", "format=tflite",
                  f"output_dir={tmp_path / 'other'}") == 2
    assert "format='tflite' is not allowed: choose one of onnx" in capsys.readouterr().err


@pytest.mark.parametrize("mode, normalize", [("mean", True), ("cls", False)])
def test_embedding_model_exports_with_its_pooling(mode, normalize, tmp_path):
    """A pruned sentence-embedding model: the graph's one output is kprune's pooled (normalised) embedding,
    and the float32 and int8 graphs' dev metrics are kprune eval's."""
    encoder = write_encoder(tmp_path / "encoder", mode, normalize)
    data = write_stsb_data(tmp_path / "stsb")
    assert kprune("run", "task=stsb_embed", f"model.path={encoder}", f"data_dir={data}", "pruner=magnitude",
                  "rate=0.5", "calibration.num_tokens=300", "device=cpu", f"output_dir={tmp_path / 'run'}") == 0
    pruned = tmp_path / "run" / "pruned"
    output = tmp_path / "onnx"
    assert kprune("export", f"checkpoint={pruned}", "task=stsb_embed", f"data_dir={data}", "quantize=int8",
                  f"output_dir={output}") == 0
    summary = json.loads((output / "export.json").read_text())
    assert summary["outputs"] == ["sentence_embedding"] and summary["pooling"] == {"mode": mode, "normalize": normalize}
    assert summary["max_abs_difference"] <= MATCH_TOLERANCE

    texts = ["good fine day", "bad dull dark night", "nice", "great bright awful poor good fine"]
    encoded = AutoTokenizer.from_pretrained(output)(texts, padding=True, return_tensors="pt")
    (found,) = run_session(ort_session(output / "model.onnx", threads=1), dict(encoded))
    expected = kprune_embeddings(pruned, texts).numpy()
    assert found.shape == expected.shape == (len(texts), 32)
    np.testing.assert_allclose(found, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(found, axis=1), 1.0, atol=1e-5) == normalize

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    metrics = summary["quantization"]["metrics"]
    assert metrics["float32"]["spearmanr"] == pytest.approx(report["metric"]["all"]["pruned"]["spearmanr"], abs=1e-6)
    assert set(metrics["int8"]) == {"spearmanr", "pearson"}
    assert 0 < summary["quantization"]["max_abs_difference"] <= 0.05  # quantized, and close


@pytest.mark.slow
def test_pruned_minilm_on_real_dev_inputs_matches_pytorch(shared_dir, tmp_path):
    """A K-prune checkpoint of MiniLM-MRPC (smoke-sized run), exported, on the first 64 dev pairs."""
    import pyarrow.parquet as pq

    from kprune_cli.models.loading import load_model
    from kprune_cli.tasks.spec import get_task

    data = shared_dir / "data" / "glue" / "mrpc"
    assert kprune("run", "preset=smoke", "task=mrpc", f"model.path={shared_dir / 'models' / 'minilm-mrpc'}",
                  f"data_dir={data}", "rate=0.5", "device=cpu", f"output_dir={tmp_path / 'run'}") == 0
    checkpoint = tmp_path / "run" / "pruned"
    assert kprune("export", f"checkpoint={checkpoint}", "task=mrpc", f"output_dir={tmp_path / 'onnx'}") == 0
    model, tokenizer = load_model(str(checkpoint), get_task("mrpc"), "cpu")
    rows = pq.read_table(data / "validation").to_pylist()[:64]
    inputs = tokenizer([row["sentence1"] for row in rows], [row["sentence2"] for row in rows], padding=True,
                       truncation=True, max_length=128, return_tensors="pt")
    session = ort_session(Path(tmp_path / "onnx" / "model.onnx"))
    difference = onnx_difference(model, session, dict(inputs))
    assert difference <= MATCH_TOLERANCE
    with torch.no_grad():
        expected = model(**inputs).logits.argmax(-1).numpy()
    found = session.run(None, {node.name: inputs[node.name].numpy() for node in session.get_inputs()})[0]
    assert np.array_equal(found.argmax(-1), expected)


def test_export_leaves_the_model_in_eval_mode(tmp_path):
    model = make_tiny_model("distilbert").eval()  # its classifier has dropout
    export_onnx(model, tmp_path / "model.onnx")
    assert not any(module.training for module in model.modules())


def test_export_keeps_the_models_precision_and_exports_float32(tmp_path):
    """A bfloat16 model (as a run with another precision, or on a GPU, holds it) is exported from a float32
    copy: ``Module.float()`` would convert the run's own model in place."""
    model = make_tiny_model("bert").eval().to(torch.bfloat16)
    export_onnx(model, tmp_path / "model.onnx")
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    graph = onnx.load(tmp_path / "model.onnx").graph
    assert {tensor.data_type for tensor in graph.initializer if tensor.dims} == {onnx.TensorProto.FLOAT}
