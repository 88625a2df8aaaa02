"""The benchmark harness on tiny models: cases, isolated runs, agreement checks, scaling fits,
latency, and the whole suite end to end (in process)."""

from __future__ import annotations

import functools
import importlib
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from torch.autograd import DeviceType

from benchmarks.cases import load_case, random_case, random_sample, truncate
from benchmarks.inference import inference_speed
from benchmarks.profile import op_group, profile_pruning, self_times
from benchmarks.pruning import agreement, compare_schedules, fit_power, run_isolated, run_variant
from benchmarks.suite import Settings, busy_warning, run_suite
from benchmarks.tables import render
from kprune_cli.core.latency import interleaved_latency, measure_latency
from kprune_cli.runtime import hardware
from kprune_cli.tasks.spec import get_task

TINY_SHAPE = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)
tiny_case = functools.partial(random_case, "tiny", vocab_size=100, lengths=(4, 24), **TINY_SHAPE)


def test_random_sample_reaches_the_token_count_sorted_longest_first():
    sample = random_sample(300, (4, 24), vocab_size=100, seed=1, batch_size=8)
    assert 300 <= sample.num_tokens < 300 + 24
    lengths = torch.cat([batch["attention_mask"].sum(dim=1) for batch in sample.batches])
    assert torch.equal(lengths, lengths.sort(descending=True).values)
    assert all(int(batch["input_ids"].max()) < 100 for batch in sample.batches)


def test_case_round_trips_through_a_directory(tmp_path):
    case = tiny_case(200)
    loaded = load_case(case.save(tmp_path / "case"))
    assert loaded.describe() == case.describe()
    inputs = case.sample.model_inputs(case.sample.batches[0], "cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).logits, case.model(**inputs).logits, rtol=0, atol=0)


def test_truncate_keeps_the_first_layers():
    case = tiny_case(100)
    first = case.model.bert.encoder.layer[0]
    truncate(case.model, 1)
    assert list(case.model.bert.encoder.layer) == [first] and case.model.config.num_hidden_layers == 1


def test_in_process_comparison_asserts_identical_decisions(tmp_path):
    result = compare_schedules(tiny_case(300).save(tmp_path / "case"), ("reference", "fast"), isolate=False)
    reference, fast = result["runs"]
    assert reference["variant"] == "reference" and "speedup" not in reference
    assert fast["masks_equal"] and fast["keep_agreement"] == 1.0 and fast["max_weight_diff"] <= 1e-5
    assert fast["speedup"] == pytest.approx(reference["wall_s"] / fast["wall_s"])
    assert set(fast["stages"]) == {"teacher", "measure", "search", "tune"}
    json.dumps(result)


@pytest.mark.slow  # starts a Python process (torch and transformers imports: seconds, more on a busy machine)
def test_isolated_run_matches_the_in_process_run(tmp_path):
    case_dir = tiny_case(200).save(tmp_path / "case")
    isolated = run_isolated(case_dir, "fast", threads=1, timeout=120)
    local = run_variant(load_case(case_dir), "fast")
    assert isolated.peak_mb is not None and isolated.peak_mb >= 0 and isolated.wall_s > 0
    assert agreement(isolated, local) == {"masks_equal": True, "keep_agreement": 1.0, "max_weight_diff": 0.0}


def test_agreement_sees_a_different_decision(tmp_path):
    case_dir = tiny_case(200).save(tmp_path / "case")
    a, b = run_variant(load_case(case_dir), "fast"), run_variant(load_case(case_dir), "fast")
    b.masks.neurons[0][torch.nonzero(b.masks.neurons[0])[0]] = 0.0
    b.weights["0.ffn"] = b.weights["0.ffn"] + 0.5
    found = agreement(a, b)
    assert not found["masks_equal"] and found["keep_agreement"] < 1.0 and found["max_weight_diff"] == pytest.approx(0.5)


def test_fit_power_recovers_the_exponent():
    xs = [1000, 2000, 4000, 8000]
    assert fit_power(xs, [3.0 * x ** 1.5 for x in xs]) == pytest.approx(1.5)
    assert fit_power(xs, [0.01 * x for x in xs]) == pytest.approx(1.0)


def test_measure_latency_reports_consistent_figures():
    model = tiny_case(50).model
    figures = measure_latency(model, batch_size=4, seq_len=16, device="cpu", repeats=5, warmup=1)
    assert figures["min_ms"] <= figures["median_ms"] <= figures["max_ms"]
    assert figures["sequences_per_s"] == pytest.approx(4000.0 / figures["median_ms"])
    assert figures["tokens_per_s"] == pytest.approx(16 * figures["sequences_per_s"])
    assert (figures["batch_size"], figures["seq_len"], figures["repeats"], figures["dtype"]) == (4, 16, 5, "float32")
    with pytest.raises(ValueError):
        measure_latency(model, batch_size=0, seq_len=16, device="cpu")


def test_interleaved_latency_times_every_model_as_often():
    models = [tiny_case(50).model, tiny_case(50, seed=1).model]
    figures = interleaved_latency(models, batch_size=2, seq_len=8, device="cpu", repeats=3, warmup=0)
    assert [f["repeats"] for f in figures] == [3, 3]
    assert all(f["min_ms"] <= f["median_ms"] <= f["max_ms"] for f in figures)


def test_inference_speed_prunes_to_the_flops_ratio():
    model = tiny_case(50).model
    rows = inference_speed(model, get_task("mrpc"), rates=(0.5,), batch_sizes=(1, 4), seq_len=12, device="cpu",
                           repeats=2)
    assert [(row["rate"], row["batch_size"]) for row in rows] == [(0.0, 1), (0.5, 1), (0.0, 4), (0.5, 4)]
    dense, pruned = rows[::2], rows[1::2]
    assert all(row["flops_ratio"] == 1.0 and row["speedup"] == 1.0 for row in dense)
    assert all(row["flops_ratio"] >= 2.0 for row in pruned)  # at most half the FLOPs kept
    assert all(row["speedup"] == pytest.approx(d["median_ms"] / row["median_ms"]) for d, row in zip(dense, pruned))
    assert sum(p.numel() for p in model.parameters()) > 0 and model.config.num_hidden_layers == 2  # dense kept


@pytest.mark.slow
def test_suite_end_to_end_in_process():
    settings = Settings(main_tokens=200, large_tokens=100, scaling_tokens=(100, 200), depths=(1, 2),
                        depth_tokens=100, rates=(0.5,), batch_sizes=(2,), repeats=2, isolate=False,
                        main_case=tiny_case, large_case=tiny_case)
    figures = run_suite(settings, console=Console(file=sys.stderr, quiet=True))
    autocast = len(settings.autocast_variants)  # fast-bf16 on the main case where this CPU has native bf16
    assert [len(result["runs"]) for result in figures["pruning"]] == [2 + autocast, 2]
    assert all(result["runs"][1]["masks_equal"] for result in figures["pruning"])
    assert [row["tokens"] for row in figures["scaling"]["tokens"]] == [
        tiny_case(100).sample.num_tokens, tiny_case(200).sample.num_tokens]
    assert [row["layers"] for row in figures["scaling"]["depth"]] == [1, 2]
    assert isinstance(figures["scaling"]["tokens_exponent"], float)
    assert len(figures["inference"]) == 2
    assert figures["profile"]["case"]["tokens"] == tiny_case(200).sample.num_tokens
    assert set(figures["profile"]["plain_matmul_gflops_s"]) == {"float32", "bfloat16"}
    assert all(value > 0 for value in figures["profile"]["plain_matmul_gflops_s"].values())
    json.dumps(figures)
    render(figures, Console(file=sys.stderr, quiet=True))


def test_profile_splits_the_pruning_by_operator_group():
    figures = profile_pruning(tiny_case(200))
    groups = figures["groups"]
    assert sum(group["share"] for group in groups.values()) == pytest.approx(1.0)
    assert sum(group["s"] for group in groups.values()) == pytest.approx(figures["self_s"])
    assert groups["matmul"]["s"] > 0 and figures["matmul_tflop"] > 0 and figures["matmul_gflops_s"] > 0
    assert figures["top_ops"] == sorted(figures["top_ops"], key=lambda op: -op["s"])
    assert set(figures["stages"]) == {"teacher", "measure", "search", "tune"}


@pytest.mark.parametrize("name, group", [
    ("aten::addmm", "matmul"), ("aten::mm", "matmul"), ("aten::bmm", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::gelu_backward", "activation"),
    ("aten::native_layer_norm_backward", "layer norm"), ("aten::copy_", "copies and casts"), ("aten::mul", "other"),
])
def test_op_group_names_the_operator_family(name, group):
    assert op_group(name) == group


def test_busy_warning_only_when_the_load_exceeds_the_cores():
    env = {"cpu_count": 2, "load_average": 0.5, "load_average_after": 1.9}
    assert busy_warning({"environment": env}) is None
    assert "busy" in busy_warning({"environment": {**env, "load_average_after": 3.5}})
    assert busy_warning({"environment": {**env, "load_average": None, "load_average_after": None}}) is None


@pytest.mark.parametrize("native", [False, True])
def test_autocast_variants_only_where_the_cpu_multiplies_bf16_natively(monkeypatch, native):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", *(("amx_bf16",) if native else ())}))
    assert Settings(device="cpu").autocast_variants == (("fast-bf16",) if native else ())


@pytest.fixture
def bench_script():
    """``python -m benchmarks`` as a module."""
    return importlib.import_module("benchmarks.__main__")


def test_script_rejects_unknown_sections(bench_script, capsys):
    assert bench_script.main(["--sections", "pruning,speed"]) == 2
    assert "speed" in capsys.readouterr().err


def test_script_rejects_a_non_positive_main_token_count(bench_script, capsys):
    assert bench_script.main(["--sections", "pruning", "--main-tokens", "0"]) == 2
    assert "--main-tokens 0" in capsys.readouterr().err


def test_device_time_counts_each_kernel_once():
    def row(key, device_type, self_device_us, self_cpu_us=1.0, flops=0):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=self_device_us,
                               self_cpu_time_total=self_cpu_us, flops=flops)

    events = [row("aten::mm", DeviceType.CPU, 100.0, flops=10), row("aten::add", DeviceType.CPU, 20.0),
              row("void cutlass_80_gemm", DeviceType.CUDA, 100.0),  # the kernel of aten::mm, already counted
              row("Memcpy HtoD", DeviceType.CUDA, 5.0)]
    device_us, flops = self_times(events, cuda=True)
    assert device_us == {"aten::mm": 100.0, "aten::add": 20.0} and flops == 10
    cpu_us, _ = self_times(events, cuda=False)
    assert sum(cpu_us.values()) == 4.0
