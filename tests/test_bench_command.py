"""``kprune bench`` on a tiny pruned checkpoint and its dense model."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
import torch
from conftest import kprune
from embedding_helpers import write_encoder, write_stsb_data

if TYPE_CHECKING:
    from _pytest.capture import CaptureResult


def test_bench_times_checkpoint_beside_its_dense_model(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    output = tmp_path / "out"
    assert kprune("run", "task=mrpc", f"model.path={tiny_checkpoint}", f"data_dir={mrpc_dir}", f"output_dir={output}",
                  "pruner=magnitude", "rate=0.6", "device=cpu") == 0
    capsys.readouterr()

    assert kprune("bench", f"checkpoint={output / 'pruned'}", f"dense={tiny_checkpoint}", "task=mrpc",
                  "batch_sizes=[1,4]", "repeats=2", "seq_len=12", "device=cpu") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert [row["batch_size"] for row in printed["rows"]] == [1, 4]
    for row in printed["rows"]:
        assert row["checkpoint"]["repeats"] == 2 and row["checkpoint"]["median_ms"] > 0
        assert row["speedup"] == row["dense"]["median_ms"] / row["checkpoint"]["median_ms"]
        assert row["flops_ratio"] > 1.5  # 60% of FLOPs removed at S = 53.24; S = 12 weighs heads less


def test_bench_times_in_the_dtype_asked(tiny_checkpoint, capsys):
    assert kprune("bench", f"checkpoint={tiny_checkpoint}", "task=mrpc", "batch_sizes=[2]", "repeats=2",
                  "seq_len=12", "device=cpu", "dtype=bf16", "onnx=false") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]["checkpoint"]["dtype"] == "bfloat16"
    assert kprune("bench", f"checkpoint={tiny_checkpoint}", "task=mrpc", "dtype=fp64", "device=cpu") == 2
    assert "dtype='fp64' is not allowed: give fp32, bf16, fp16" in capsys.readouterr().err


def test_onnx_auto_times_onnx_runtime_on_a_cpu_bench_only(monkeypatch):
    from kprune_cli.cli import bench
    from kprune_cli.deploy import onnx_model

    monkeypatch.setattr(onnx_model, "onnx_available", lambda: True)
    assert bench._onnx_wanted("auto", torch.device("cpu"))
    assert not bench._onnx_wanted("auto", torch.device("cuda", 0))
    assert not bench._onnx_wanted(False, torch.device("cpu"))


def test_bench_rejects_bad_values(tiny_checkpoint, capsys):
    assert kprune("bench", f"checkpoint={tiny_checkpoint}", "task=mrpc", "repeats=0", "device=cpu") == 2
    assert "repeats=0" in capsys.readouterr().err
    assert kprune("bench", f"checkpoint={tiny_checkpoint}", "task=mrpc", "seq_len=0", "device=cpu") == 2
    assert "seq_len=0 is not allowed: give an integer >= 1 or null" in capsys.readouterr().err


def bench_pruned(checkpoint, data, tmp_path, capsys, *bench_args: str) -> tuple[dict, CaptureResult[str]]:
    """Prune the tiny ``checkpoint`` (magnitude, rate 0.6) and bench it beside it (batch 2 x 12 tokens,
    2 repeats, with ``bench_args``); the bench's JSON row and what it printed."""
    output = tmp_path / "out"
    assert kprune("run", "task=mrpc", f"model.path={checkpoint}", f"data_dir={data}", f"output_dir={output}",
                  "pruner=magnitude", "rate=0.6", "device=cpu") == 0
    capsys.readouterr()
    assert kprune("bench", f"checkpoint={output / 'pruned'}", f"dense={checkpoint}", "task=mrpc",
                  "batch_sizes=[2]", "repeats=2", "seq_len=12", "device=cpu", *bench_args) == 0
    captured = capsys.readouterr()
    (row,) = json.loads(captured.out.strip().splitlines()[-1])["rows"]
    return row, captured


def test_bench_adds_an_onnx_runtime_column(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    row, captured = bench_pruned(tiny_checkpoint, mrpc_dir, tmp_path, capsys, "onnx=true")
    ort = row["onnxruntime"]
    assert ort["checkpoint"]["repeats"] == 2 and ort["checkpoint"]["batch_size"] == 2
    assert row["onnxruntime_speedup"] == ort["dense"]["median_ms"] / ort["checkpoint"]["median_ms"]
    assert "ORT" in captured.err  # the table's ONNX Runtime columns
    assert kprune("bench", f"checkpoint={tiny_checkpoint}", "task=mrpc", "repeats=1", "seq_len=8",
                  "batch_sizes=[1]", "device=cpu", "onnx=false") == 0
    assert "onnxruntime" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]


def test_bench_rejects_a_bad_onnx_value(tiny_checkpoint, capsys):
    assert kprune("bench", f"checkpoint={tiny_checkpoint}", "task=mrpc", "onnx=maybe", "device=cpu") == 2
    assert "onnx='maybe' is not allowed: give auto, true or false" in capsys.readouterr().err


def test_bench_times_a_sentence_embedding_model_with_its_pooling(tmp_path, capsys):
    """A bare encoder (task=stsb_embed): PyTorch and ONNX Runtime both time the pooled embedding; the
    task has no tabled sequence length, so ``seq_len`` is asked for."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    encoder = write_encoder(tmp_path / "encoder")
    output = tmp_path / "out"
    assert kprune("run", "task=stsb_embed", f"model.path={encoder}", f"data_dir={write_stsb_data(tmp_path / 'stsb')}",
                  "pruner=magnitude", "rate=0.5", "calibration.num_tokens=300", "device=cpu",
                  f"output_dir={output}") == 0
    capsys.readouterr()
    bench = ("bench", f"checkpoint={output / 'pruned'}", f"dense={encoder}", "task=stsb_embed", "batch_sizes=[4]",
             "repeats=2", "device=cpu", "onnx=true")
    assert kprune(*bench) == 2
    assert "task=stsb_embed has no tabled average sequence length: pass seq_len=<tokens>" in capsys.readouterr().err
    assert kprune(*bench, "seq_len=12") == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    for figures in (row, row["onnxruntime"]):
        assert figures["checkpoint"]["sequences_per_s"] > 0 and figures["dense"]["sequences_per_s"] > 0
    assert row["flops_ratio"] > 1.5
