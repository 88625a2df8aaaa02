"""``kprune export quantize=int8`` and ``kprune bench quantize=int8``: the int8 ONNX model, its
settings and dev metrics in export.json, nothing left behind on failure, the int8 bench column."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, kprune, make_tiny_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from test_bench_command import bench_pruned
from test_onnx import prune_with_empty_sublayers

from kprune_cli.core.evaluation import evaluate_model
from kprune_cli.deploy.onnx_model import example_inputs, export_onnx, ort_session, run_session
from kprune_cli.deploy.quantization import INT8_FILE, INT8_SETTINGS, SessionModel, quantize_int8
from kprune_cli.models.loading import load_model
from kprune_cli.tasks.data import load_task_data
from kprune_cli.tasks.spec import get_task

# The integer kernels ONNX Runtime's dynamic quantization puts in place of the quantized MatMuls.
INTEGER_OPS = {"MatMulInteger", "DynamicQuantizeMatMul"}


def evaluate_session(path: Path, checkpoint: Path, data_dir: Path, max_examples: int | None = None) -> dict:
    """The MRPC dev metrics of the ONNX model at ``path`` (``checkpoint``'s tokenizer), as `kprune eval`
    computes them."""
    task = get_task("mrpc")
    _, tokenizer = load_model(str(checkpoint), task, "cpu")
    data = load_task_data(task, data_dir, splits=task.eval_splits)
    return evaluate_model(SessionModel(ort_session(path)), tokenizer, task, data, "cpu", max_examples=max_examples)


def int8_beside_float32(model: torch.nn.Module, directory: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """``model`` exported and quantized in ``directory``: the quantization summary, and the float32 and
    int8 ONNX models' logits ``(16, num_labels)`` on the same random inputs."""
    export_onnx(model, directory / "model.onnx")
    settings = quantize_int8(directory / "model.onnx", directory / INT8_FILE)
    inputs = example_inputs(model, batch_size=16, seq_len=24, seed=3)
    (float32,) = run_session(ort_session(directory / "model.onnx", threads=1), inputs)
    (int8,) = run_session(ort_session(directory / INT8_FILE, threads=1), inputs)
    return settings, float32, int8


def test_int8_model_quantizes_every_linear_and_stays_close_to_float32(tmp_path):
    settings, float32, int8 = int8_beside_float32(make_tiny_model("bert").eval(), tmp_path)
    assert settings["bytes"]["int8"] < settings["bytes"]["float32"] and settings["empty_products_left_float"] == 0
    ops = [node.op_type for node in onnx.load(tmp_path / INT8_FILE).graph.node]
    # 2 layers x 6 encoder Linears (q, k, v, attention output, FFN in and out), the pooler and the
    # classifier; attention's 2 products of two activations per layer stay float (MatMulConstBOnly).
    assert sum(op in INTEGER_OPS for op in ops) == 2 * 6 + 2 and ops.count("MatMul") == 2 * 2
    assert not np.array_equal(int8, float32)  # it is quantized
    assert np.abs(int8 - float32).max() <= 0.05 * np.abs(float32).max()


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_with_emptied_sublayers_quantizes(family, tmp_path):
    """Layer 0 without attention, layer 1 without FFN: their Linears have no elements to quantize."""
    model = make_tiny_model(family).eval()
    prune_with_empty_sublayers(model)
    settings, float32, int8 = int8_beside_float32(model, tmp_path)
    # The products left with an empty weight in the exported graph: layer 0's attention output, layer 1's FFN input.
    assert settings["empty_products_left_float"] == 2
    assert np.abs(int8 - float32).max() <= 0.05 * np.abs(float32).max()


def test_session_model_answers_like_the_model_for_question_answering(tmp_path):
    model = make_tiny_model("bert", head="qa").eval()
    export_onnx(model, tmp_path / "model.onnx")
    wrapped = SessionModel(ort_session(tmp_path / "model.onnx", threads=1)).eval()
    inputs = example_inputs(model, batch_size=3, seq_len=10)
    found = wrapped(**inputs)
    with torch.no_grad():
        expected = model(**inputs)
    assert set(found) == {"start_logits", "end_logits"}
    for name, value in found.items():
        assert value.shape == (3, 10) and torch.allclose(value, expected[name], atol=1e-4)


def test_export_quantize_int8_writes_model_settings_and_dev_metrics(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    output = tmp_path / "onnx"
    assert kprune("export", f"checkpoint={tiny_checkpoint}", "task=mrpc", f"output_dir={output}", "quantize=int8",
                  f"data_dir={mrpc_dir}") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((output / "export.json").read_text())
    assert printed["quantization"] == summary["quantization"]
    quantization = summary["quantization"]
    assert quantization["file"] == INT8_FILE and (output / INT8_FILE).is_file()
    assert {key: quantization[key] for key in INT8_SETTINGS} == INT8_SETTINGS
    assert 0 < quantization["max_abs_difference"] < 0.1

    # The recorded metrics are those of evaluating each ONNX Runtime session as `kprune eval` does.
    for precision, file in (("float32", "model.onnx"), ("int8", INT8_FILE)):
        assert quantization["metrics"][precision] == evaluate_session(output / file, tiny_checkpoint, mrpc_dir)
    assert set(quantization["metrics"]["int8"]) == {"accuracy", "f1"}
    assert quantization["eval_max_examples"] is None and "metrics_note" not in quantization


def test_export_quantize_int8_without_data_skips_the_metrics_and_caps_with_eval_max_examples(
        tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    assert kprune("export", f"checkpoint={tiny_checkpoint}", "task=mrpc", f"output_dir={tmp_path / 'a'}",
                  "quantize=int8") == 0
    captured = capsys.readouterr()
    quantization = json.loads(captured.out.strip().splitlines()[-1])["quantization"]
    assert "metrics" not in quantization and "data_dir=" in quantization["metrics_note"]
    assert "no dev metrics" in captured.err

    assert kprune("export", f"checkpoint={tiny_checkpoint}", "task=mrpc", f"output_dir={tmp_path / 'b'}",
                  "quantize=int8", f"data_dir={mrpc_dir}", "eval_max_examples=3") == 0
    quantization = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["quantization"]
    assert quantization["eval_max_examples"] == 3 and "eval_max_examples=3" in quantization["metrics_note"]
    assert quantization["metrics"]["int8"] == evaluate_session(tmp_path / "b" / INT8_FILE, tiny_checkpoint, mrpc_dir,
                                                               max_examples=3)


def test_export_rejects_a_bad_quantize_value_in_one_line(tiny_checkpoint, tmp_path, capsys):
    assert kprune("export", f"checkpoint={tiny_checkpoint}", "task=mrpc", f"output_dir={tmp_path / 'onnx'}",
                  "quantize=int4") == 2
    error = capsys.readouterr().err.strip()
    assert error.splitlines() == [error] and "quantize='int4' is not allowed: choose null or one of int8" in error
    assert not (tmp_path / "onnx").exists()


def test_a_failing_quantization_leaves_nothing_on_disk(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import onnxruntime.quantization

    def fail(*args, **kwargs):
        raise RuntimeError("quantization failed")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", fail)
    output = tmp_path / "out" / "onnx"
    assert kprune("export", f"checkpoint={tiny_checkpoint}", "task=mrpc", f"output_dir={output}",
                  "quantize=int8") != 0
    assert "quantization failed" in capsys.readouterr().err
    assert not output.exists() and not list(output.parent.iterdir())  # no staging directory either


def test_bench_adds_an_int8_onnx_runtime_column(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    row, captured = bench_pruned(tiny_checkpoint, mrpc_dir, tmp_path, capsys, "quantize=int8")
    int8 = row["onnxruntime_int8"]
    assert set(int8) == {"checkpoint", "dense"} and int8["checkpoint"]["repeats"] == 2
    assert row["onnxruntime_int8_speedup"] == row["onnxruntime"]["dense"]["median_ms"] / int8["checkpoint"]["median_ms"]
    assert "int8" in captured.err  # the table's int8 columns
    assert kprune("bench", f"checkpoint={tiny_checkpoint}", "task=mrpc", "device=cpu", "onnx=false",
                  "quantize=int8") == 2
    assert "quantize=int8 times ONNX Runtime models: it needs onnx=true" in capsys.readouterr().err
