"""``constraint=latency`` end to end: ``kprune run`` and ``kprune latency-table`` on a tiny model (the real
runtime, its noise not checked: latency.max_error is lifted), and the pruners under a latency budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import kprune
from kprune_helpers import make_problem, make_sample
from test_kwon import labelled

import kprune_cli.cli.run as run_module
from kprune_cli.core.latency_budget import verify_speedup
from kprune_cli.core.latency_table import TableSettings, fingerprint, table_path
from kprune_cli.core.runners import RuntimeShape
from kprune_cli.models.latency_table import LatencyCost, LatencyTable
from kprune_cli.models.loading import load_model
from kprune_cli.pruners.kprune.pruner import KPrunePruner
from kprune_cli.pruners.kwon.pruner import KwonPruner
from kprune_cli.pruners.kwon.search import fit_piecewise_linear
from kprune_cli.runtime.allocator import DEPLOY_ENV, serving_note
from kprune_cli.tasks.spec import get_task

QUICK_LATENCY = ("constraint=latency", "latency.runtime=torch", "latency.threads=1", "latency.batch_size=2",
                 "latency.seq_len=8", "latency.repeats=3", "latency.configurations=2", "latency.max_error=100",
                 "latency.verify_repeats=5", "latency.verify_seconds=0", "latency.replan=false")
"""A tiny table, timed quickly; a shared test machine's timing noise is not what these tests check (nor is a
re-plan, which a miss on a designed table would start: one test below forces one)."""


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KPRUNE_CACHE", str(tmp_path / "cache"))


def run_args(checkpoint, data, output, *extra):
    return ["run", "task=mrpc", f"model.path={checkpoint}", f"data_dir={data}", f"output_dir={output}",
            "calibration.num_tokens=300", "calibration.batch_size=8", "device=cpu", *QUICK_LATENCY, *extra]


QUICK_SHAPE = RuntimeShape("torch", torch.device("cpu"), 1, 2, 8)
"""Where :data:`QUICK_LATENCY` times."""


def seed_cache(checkpoint, shape: RuntimeShape = QUICK_SHAPE) -> LatencyTable:
    """Put a designed table (dense 5.68 ms, emptied 2 ms: 2.84x at most) in the cache under the fingerprint
    of the runs' model and runtime (``shape``), so that the budget is the same on every machine."""
    model, _ = load_model(str(checkpoint), get_task("mrpc"), "cpu")
    settings = TableSettings(repeats=3, configurations=2, max_error=100)
    found = fingerprint(model, shape, settings)
    table = LatencyTable(found, 2, 1.0, 0.5, tuple(0.3 * h for h in range(5)), (0, 32, 64), (0.0, 0.32, 0.64),
                         fit={"r2": 1.0, "worst_error": 0.0, "configurations": 4})
    path = table_path(found)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(table.to_json()))
    return table


def test_a_latency_run_reports_its_measured_speedup(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    table = seed_cache(tiny_checkpoint)
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, tmp_path / "out", "rate=0.3")) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    block = report["latency"]
    assert (block["runtime"], block["batch_size"], block["seq_len"], block["threads"]) == ("torch", 2, 8, 1)
    assert block["speedup"] == pytest.approx(block["dense_ms"] / block["pruned_ms"])
    low, high = block["speedup_ci"]
    assert low <= block["speedup"] <= high
    assert block["target_speedup"] == pytest.approx(1 / 0.7)
    assert block["met"] == (low >= 0.95 * block["target_speedup"])
    assert block["predicted_ms"] == pytest.approx(table.predict_ms(report["layers"]))
    assert block["predicted_ms"] <= 0.7 * table.predict_ms(table.full()) + 1e-9  # the budget was kept
    assert block["repeats"] == 5 and block["table_fit"]["configurations"] == 4
    assert any("latency table from the cache" in note for note in report["notes"])
    if serving_note() is not None:  # glibc: the report says how to serve at the speed it measured
        assert serving_note() in report["notes"] and DEPLOY_ENV in serving_note()
    assert "## Measured latency" in (tmp_path / "out" / "report.md").read_text()
    assert "measured speedup" in capsys.readouterr().err


INT8_SHAPE = RuntimeShape("onnxruntime", torch.device("cpu"), 1, 2, 8, quantize="int8")


def int8_run_args(checkpoint, data, output, *extra):
    return [arg.replace("=torch", "=onnxruntime")
            for arg in run_args(checkpoint, data, output, "latency.quantize=int8", *extra)]


def test_an_int8_latency_run_times_and_scores_the_quantized_model(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    """latency.quantize=int8: the budget is spent from the int8 table, dense and pruned are timed as int8
    ONNX Runtime models beside the dense float32 one, and the pruned int8 model's metric is reported."""
    pytest.importorskip("onnxruntime")
    table = seed_cache(tiny_checkpoint, INT8_SHAPE)
    assert kprune(*int8_run_args(tiny_checkpoint, mrpc_dir, tmp_path / "out", "rate=0.3")) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    block = report["latency"]
    assert (block["runtime"], block["quantize"]) == ("onnxruntime", "int8")
    assert any("latency table from the cache" in note for note in report["notes"])  # the int8 table, seeded
    assert block["predicted_ms"] <= 0.7 * table.predict_ms(table.full()) + 1e-9
    assert block["speedup_over_float32"] == pytest.approx(block["dense_float32_ms"] / block["pruned_ms"])
    low, high = block["speedup_over_float32_ci"]
    assert low <= block["speedup_over_float32"] <= high
    metric = report["metric"]
    assert 0.0 <= metric["pruned_int8"] <= 1.0 and metric["all"]["pruned_int8"]["accuracy"] == metric["pruned_int8"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "accuracy, ONNX Runtime int8" in markdown and "onnxruntime int8 on cpu" in markdown
    assert "The dense float32 model, timed in the same turns" in markdown
    err = capsys.readouterr().err
    assert "on onnxruntime int8" in err and "over the dense float32 model" in err


def test_a_float32_baseline_prunes_the_int8_model_for_the_target_over_float32(tiny_checkpoint, mrpc_dir, tmp_path,
                                                                              monkeypatch, capsys):
    """latency.baseline=float32 rate=0.3 where int8 runs 1.2x faster than float32: the int8 model is pruned to
    1 - 0.7 * 1.2 = 0.16 of its own time, and the report judges the target over float32."""
    pytest.importorskip("onnxruntime")
    table = seed_cache(tiny_checkpoint, INT8_SHAPE)
    monkeypatch.setattr("kprune_cli.cli.run.float32_over_quantized", lambda *timed: 1.2)
    assert kprune(*int8_run_args(tiny_checkpoint, mrpc_dir, tmp_path / "out", "rate=0.3",
                                 "latency.baseline=float32")) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    block = report["latency"]
    assert block["target_speedup"] == pytest.approx(1 / 0.84)  # over the dense int8 model
    assert block["predicted_ms"] <= 0.84 * table.predict_ms(table.full()) + 1e-9
    baseline = block["baseline"]
    assert baseline["target_speedup"] == pytest.approx(1 / 0.7) and baseline["float32_ratio"] == 1.2
    assert baseline["met"] == (block["speedup_over_float32_ci"][0] >= 0.95 / 0.7)
    assert any("rate 0.3 of the float32 time (1.43x) was pruned as rate 0.1600" in note for note in report["notes"])
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "Target over float32 (latency.baseline=float32, rate 0.3): 1.43x" in markdown
    assert "over the dense float32 model" in capsys.readouterr().err


def test_latency_table_command_plans_a_float32_baseline_rate_as_kprune_run_does(tiny_checkpoint, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    seed_cache(tiny_checkpoint, INT8_SHAPE)
    monkeypatch.setattr("kprune_cli.cli.latency_table.float32_over_quantized", lambda *timed: 1.2)
    args = ["latency-table", f"checkpoint={tiny_checkpoint}", "task=mrpc", "rate=0.3",
            *[arg.replace("=torch", "=onnxruntime") for arg in QUICK_LATENCY[1:]],
            "latency.quantize=int8", "latency.baseline=float32"]
    assert kprune(*args) == 0
    err = capsys.readouterr().err
    assert "was pruned as rate 0.1600" in err and "rate=0.16 (1.19x) is reachable" in err


def test_a_float32_target_the_int8_model_meets_unpruned_is_one_line(tiny_checkpoint, mrpc_dir, tmp_path,
                                                                    monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr("kprune_cli.cli.run.float32_over_quantized", lambda *timed: 2.0)
    output = tmp_path / "out"
    assert kprune(*int8_run_args(tiny_checkpoint, mrpc_dir, output, "rate=0.3", "latency.baseline=float32")) == 2
    error = capsys.readouterr().err
    assert "asks for 1.43x over float32, and the dense model runs 2.00x faster than float32" in error
    assert "give rate > 0.500" in error and "Traceback" not in error
    assert not (output / "report.json").exists()


@pytest.mark.parametrize(("keys", "message"), [
    (("latency.baseline=fp16",), "latency.baseline=fp16: choose runtime or float32"),
    (("latency.baseline=float32",), "latency.baseline=float32 compares with the dense float32 model beside a "
                                    "quantized one: it needs latency.quantize=int8"),
    (("latency.quantize=int4",), "latency.quantize='int4' is not allowed: choose null or int8"),
    (("latency.quantize=int8",), "latency.quantize=int8 times ONNX Runtime's quantized models: give "
                                 "latency.runtime=onnxruntime (not torch)"),
])
def test_a_bad_latency_quantization_is_one_line(tiny_checkpoint, mrpc_dir, tmp_path, capsys, keys, message):
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, tmp_path / "out", *keys)) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_a_missed_target_is_pruned_once_more_for_the_corrected_target(tiny_checkpoint, mrpc_dir, tmp_path,
                                                                       monkeypatch):
    """The first verification says the table was 25% optimistic (a miss); the run prunes again from the
    dense model with a target 1.25x higher, keeps the second plan and records both."""
    table = seed_cache(tiny_checkpoint)
    calls = []

    def verify(dense, pruned, shape, repeats, used_table, rate, structure, min_seconds):
        calls.append(structure)
        predicted = table.predict_ms(table.full()) / table.predict_ms(structure)
        measured = predicted / (1.25 if len(calls) == 1 else 1.0)
        return verify_speedup(dense, pruned, shape, repeats, used_table, rate, structure,
                              times=[[10.0] * 5, [10.0 / measured] * 5])

    monkeypatch.setattr("kprune_cli.cli.run.verify_speedup", verify)
    prune_and_slice = run_module.prune_and_slice

    def prune_with_a_note(pruner, problem, notes):
        notes.append("a pruner's note")
        return prune_and_slice(pruner, problem, notes)

    monkeypatch.setattr(run_module, "prune_and_slice", prune_with_a_note)
    args = [arg for arg in run_args(tiny_checkpoint, mrpc_dir, tmp_path / "out", "rate=0.3") if "replan" not in arg]
    assert kprune(*args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    replan = report["latency"]["replan"]
    assert len(calls) == 2 and report["latency"]["met"]
    assert replan["planned_speedup"] == pytest.approx(replan["first_predicted_speedup"] / replan["first_speedup"]
                                                      / 0.7)
    assert table.predict_ms(calls[1]) < table.predict_ms(calls[0])  # the second plan asked for more
    assert report["layers"] == calls[1]
    assert any("pruned once more from the dense model" in note for note in report["notes"])
    assert report["notes"].count("a pruner's note") == 1  # pruned twice, said once
    assert "Re-planned: the first plan ran" in (tmp_path / "out" / "report.md").read_text()


def test_an_unreachable_latency_target_ends_in_one_line_before_pruning(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    seed_cache(tiny_checkpoint)
    capsys.readouterr()  # loading the model to seed the cache may show transformers' progress bar
    output = tmp_path / "out"
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "rate=0.8")) == 2
    error = capsys.readouterr().err.strip()
    assert "5.00x speedup, but even emptying every sub-layer runs only 2.84x faster" in error
    assert "give rate < 0.648" in error and "Traceback" not in error
    assert [line for line in error.splitlines() if not line.startswith("device:")] == [error.splitlines()[-1]]
    assert not (output / "pruned").exists() and not (output / "report.json").exists()


def test_latency_table_command_measures_prints_and_caches_a_table(tiny_checkpoint, capsys):
    args = ["latency-table", f"checkpoint={tiny_checkpoint}", "task=mrpc", *QUICK_LATENCY[1:]]
    assert kprune(*args) == 0
    printed = capsys.readouterr()
    table = json.loads(printed.out.strip().splitlines()[-1])
    assert len(table["mha_ms"]) == 5 and table["ffn_widths"][-1] == 64
    assert "latency table measured" in printed.err and "MHA" in printed.err
    assert Path(table["path"]).is_file()
    assert kprune(*args) == 0
    assert "from the cache" in capsys.readouterr().err


def test_a_bad_latency_key_is_one_line(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, tmp_path / "out", "latency.runtime=tensorrt")) == 2
    assert "latency.runtime=tensorrt: choose onnxruntime or torch" in capsys.readouterr().err


TABLE = LatencyTable({}, 2, 1.0, 0.5, (0.0, 0.3, 0.5, 0.9, 1.0), tuple(range(0, 65, 16)),
                     (0.0, 0.2, 0.45, 0.6, 0.8), scale=1.1, offset=0.2)
"""A stepped, non-linear table of the 2-layer tiny model (4 heads, 64 neurons)."""


@pytest.mark.parametrize("rate", [0.3, 0.5])
def test_kprune_keeps_the_predicted_latency_within_the_budget(tiny_model, rate):
    model = tiny_model()
    problem = make_problem(model, rate=rate, sample=make_sample(model))
    problem.latency = LatencyCost(TABLE)
    result = KPrunePruner(micro_batch_size=8).prune(problem)
    kept = result.masks.kept()
    assert TABLE.predict_ms(kept) <= (1 - rate) * TABLE.predict_ms(TABLE.full()) + 1e-9
    assert TABLE.predict_ms(kept) < TABLE.predict_ms(TABLE.full())


def test_kwon_searches_its_latency_mode_within_the_budget(tiny_model):
    model = tiny_model()
    problem = make_problem(model, rate=0.4, sample=labelled(make_sample(model)))
    cost = problem.latency = LatencyCost(TABLE)
    masks = KwonPruner(tune=False, rearrange=False).prune(problem).masks
    # Their search binds the piecewise-linear fit of each table (fit_piecewise_linear), as theirs does.
    fits = {kind: fit_piecewise_linear(cost.by_width(kind)[1:]) for kind in ("mha", "ffn")}

    def fitted(kind, width):
        fit = fits[kind]
        return 0.0 if width == 0 else fit.constant + fit.slope * max(0, width - fit.threshold)

    spent = sum(fitted("mha", int(heads.count_nonzero())) + fitted("ffn", int(neurons.count_nonzero()))
                for heads, neurons in zip(masks.heads, masks.neurons))
    assert spent <= problem.budget + 1e-9
    assert any(bool((mask == 0).any()) for mask in [*masks.heads, *masks.neurons])
