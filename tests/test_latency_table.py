"""Latency tables (constraint=latency): the parts, the additivity check, the cache, and the cost model
the searches spend them through; with a fake timer (exact and fast) and, once, the real runtimes."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from rich.progress import Progress
from conftest import FAMILIES, OTHER_FAMILIES, make_tiny_model
from kprune_helpers import DEVICES, TINY_FLOPS

from kprune_cli.core.latency_budget import (
    bootstrap_interval,
    check_reachable,
    float32_over_quantized,
    latency_cost,
    time_on_runtimes,
    verify_speedup,
)
from kprune_cli.core.latency_table import (
    TableSettings,
    fingerprint,
    fit_additivity,
    load_or_measure,
    measure_table,
    non_decreasing,
    table_path,
)
from kprune_cli.config.settings import LATENCY_QUANTIZATIONS
from kprune_cli.core.runners import RuntimeShape
from kprune_cli.deploy.onnx_model import example_inputs
from kprune_cli.deploy.quantization import QUANTIZATIONS
from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.latency_table import LatencyCost, LatencyTable
from kprune_cli.models.masks import Masks
from kprune_cli.models.slicing import prune_physically
from kprune_cli.models.structured import model_with_structure
from kprune_cli.pruners.common.kpms import kpms
from kprune_cli.runtime.allocator import describe_allocator
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.timing import time_in_turns

SHAPE = RuntimeShape("torch", torch.device("cpu"), 1, 2, 8)
SETTINGS = TableSettings(repeats=3, ffn_step=16, configurations=6)


def additive_ms(structure: list[dict[str, int]]) -> float:
    """A runtime that is exactly additive: 1 ms fixed, 0.5 ms per emptied layer, 0.1 ms a head,
    0.01 ms a neuron."""
    return 1.0 + sum(0.5 + 0.1 * layer["heads"] + 0.01 * layer["neurons"] for layer in structure)


def fake_timer(ms, calls: list[int] | None = None):
    """A timer giving each model ``ms(structure)`` in every round; counts the models it times in ``calls``."""
    def timer(models):
        if calls is not None:
            calls.append(len(models))
        return [[ms(get_adapter(model).structure())] * 3 for model in models]
    return timer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_an_additive_runtime_gives_its_parts_back(tiny_model):
    model = tiny_model()  # 2 layers, 4 heads, 64 neurons
    table = measure_table(model, SHAPE, SETTINGS, timer=fake_timer(additive_ms))
    assert table.fixed_ms == pytest.approx(1.0) and table.empty_layer_ms == pytest.approx(0.5)
    assert table.mha_ms == pytest.approx([0.1 * h for h in range(5)])
    assert table.ffn_widths == (0, 16, 32, 48, 64)
    assert table.ffn_ms == pytest.approx([0.01 * n for n in table.ffn_widths])
    assert table.sublayer_ms("ffn", 40) == pytest.approx(0.40)  # interpolated between 32 and 48
    assert (table.scale, table.offset) == pytest.approx((1.0, 0.0), abs=1e-9)
    assert table.fit["worst_error"] < 1e-9 and table.fit["configurations"] == SETTINGS.configurations + 2
    structure = [{"heads": 3, "neurons": 17}, {"heads": 0, "neurons": 64}]
    assert table.predict_ms(structure) == pytest.approx(additive_ms(structure))


def test_a_table_that_does_not_add_up_is_checked_twice_then_refused_in_one_line(tiny_model, cache):
    def crowded(structure):  # whole models run slower than their parts: not affine in the table's sum
        heads = sum(layer["heads"] for layer in structure)
        return additive_ms(structure) + 0.4 * heads ** 2
    calls = []
    with pytest.raises(UserError, match=r"does not add up .*\(allowed 5%.*timed twice") as error:
        load_or_measure(tiny_model(), SHAPE, SETTINGS, timer=fake_timer(crowded, calls))
    assert "\n" not in str(error.value)
    assert len(calls) == 4  # two groups of parts, the check, the check again
    refused = list(cache.glob("latency-tables/*.refused.json"))
    assert len(refused) == 1 and str(refused[0]) in str(error.value)
    assert not [path for path in cache.glob("latency-tables/*.json") if ".refused" not in path.name]


def test_a_noisy_first_check_is_timed_again_and_averaged(tiny_model):
    calls = []

    def noisy(models):  # the emptied model ran 30% slow in the first check (the third group timed)
        calls.append(len(models))
        times = fake_timer(additive_ms)(models)
        if len(calls) == 3:
            times[0] = [value * 1.3 for value in times[0]]
        return times
    table = measure_table(tiny_model(), SHAPE, SETTINGS, timer=noisy)
    assert len(calls) == 4  # two groups of parts, the check, the check again
    emptied = table.checks[1]
    assert emptied["measured_ms"] == pytest.approx(1.15 * additive_ms(table.emptied()))


@pytest.mark.parametrize("noisy", [False, True])
def test_the_progress_bar_ends_full_also_when_the_check_is_timed_again(tiny_model, noisy):
    calls = []

    def timer(models):  # with noisy, the first check is off by 30% on one model, so it is timed again
        calls.append(len(models))
        times = fake_timer(additive_ms)(models)
        if noisy and len(calls) == 3:
            times[0] = [value * 1.3 for value in times[0]]
        return times
    progress = Progress(disable=True)
    measure_table(tiny_model(), SHAPE, SETTINGS, progress=progress, timer=timer)
    (task,) = progress.tasks
    assert len(calls) == (4 if noisy else 3)
    assert task.completed == task.total


def test_noisy_widths_are_smoothed_non_decreasing_and_never_below_the_emptied_sublayer():
    assert non_decreasing([0.3, 0.2, 0.5, 0.4, 0.9]) == pytest.approx([0.25, 0.25, 0.45, 0.45, 0.9])
    assert non_decreasing([-0.2, 0.1]) == [0.0, 0.1]
    values = non_decreasing([3.0, 1.0, 2.0, 0.5, 4.0])
    assert values == sorted(values)


def test_the_fit_is_affine_in_the_tables_sum():
    table = LatencyTable({}, 1, 1.0, 0.5, (0.0, 1.0), (0, 4), (0.0, 2.0))
    structures = [[{"heads": h, "neurons": n}] for h, n in ((0, 0), (1, 0), (0, 4), (1, 4))]
    measured = [2.0 * table.raw_ms(s) + 0.3 for s in structures]
    fitted = fit_additivity(table, structures, measured)
    assert (fitted.scale, fitted.offset) == pytest.approx((2.0, 0.3))
    assert fitted.fit["r2"] == pytest.approx(1.0)
    assert [check["measured_ms"] for check in fitted.checks] == pytest.approx(measured)


def test_tables_are_cached_by_fingerprint_and_measured_again_when_it_differs(tiny_model, cache):
    model, calls, notes = tiny_model(), [], []
    first = load_or_measure(model, SHAPE, SETTINGS, notes=notes, timer=fake_timer(additive_ms, calls))
    measured = len(calls)
    assert measured > 0 and "measured" in notes[-1]
    again = load_or_measure(model, SHAPE, SETTINGS, notes=notes, timer=fake_timer(additive_ms, calls))
    assert len(calls) == measured and again == first and "from the cache" in notes[-1]
    assert first.fingerprint["allocator"] == describe_allocator()  # timed with another allocator: measured again
    two_threads = RuntimeShape("torch", torch.device("cpu"), 2, 2, 8)  # another fingerprint: never reused
    other = load_or_measure(model, two_threads, SETTINGS, notes=notes, timer=fake_timer(additive_ms, calls))
    assert len(calls) > measured and other.fingerprint["threads"] == 2
    path = table_path(first.fingerprint)
    stored = json.loads(path.read_text())
    stored["fingerprint"]["threads"] = 7  # a table whose fingerprint does not match its key
    path.write_text(json.dumps(stored))
    calls.clear()
    load_or_measure(model, SHAPE, SETTINGS, notes=notes, timer=fake_timer(additive_ms, calls))
    assert calls and "did not match" in notes[-2]
    assert not list(path.parent.glob("*.tmp-*"))


def test_latency_cost_steps_add_up_to_the_kept_cost():
    table = LatencyTable({}, 2, 1.0, 0.5, (0.0, 0.4, 0.5, 0.9), (0, 8, 16), (0.0, 0.2, 0.6), scale=2.0, offset=0.1)
    cost = LatencyCost(table)
    steps = cost.unit_costs("ffn", 16)
    assert float(steps.sum()) == pytest.approx(cost.kept_cost("ffn", 16)) == pytest.approx(1.2)
    assert cost.by_width("mha") == pytest.approx([0.0, 0.8, 1.0, 1.8])
    dense = table.full()
    assert cost.budget(0.0, dense) == pytest.approx(cost.total(dense))
    assert cost.budget(0.5, dense) == pytest.approx(0.5 * table.predict_ms(dense) - table.predict_ms(table.emptied()))


def test_kpms_with_a_latency_table_linear_in_flops_keeps_what_the_flops_search_keeps():
    generator = torch.Generator().manual_seed(0)
    heads, neurons = 4, 64
    table = LatencyTable({}, 2, 0.0, 0.0, tuple(h * TINY_FLOPS.head for h in range(heads + 1)),
                         tuple(range(neurons + 1)), tuple(n * TINY_FLOPS.neuron for n in range(neurons + 1)))
    cost = LatencyCost(table)
    for trial in range(20):
        scores = {s: torch.rand(heads if s % 2 == 0 else neurons, generator=generator, dtype=torch.float64)
                  for s in range(4)}
        budget = float(torch.rand(1, generator=generator)) * cost.total(table.full())
        expected, found = kpms(scores, TINY_FLOPS, budget), kpms(scores, cost, budget)
        assert all(torch.equal(expected[s], found[s]) for s in scores), trial


def test_kpms_spends_a_stepped_latency_budget_on_each_sublayers_next_step():
    # 1 head costs 1.0, the 2nd nothing more (a runtime step), the 3rd 1.0 again.
    table = LatencyTable({}, 1, 0.0, 0.0, (0.0, 1.0, 1.0, 2.0), (0, 1), (0.0, 5.0))
    scores = {0: torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), 1: torch.tensor([0.5], dtype=torch.float64)}
    keep = kpms(scores, LatencyCost(table), budget=1.5)
    assert keep[0].tolist() == [True, True, False] and keep[1].tolist() == [False]


def test_an_unreachable_rate_names_the_largest_reachable_speedup():
    table = LatencyTable({}, 2, 1.0, 0.5, (0.0, 1.0), (0, 4), (0.0, 2.0))  # dense 8 ms, emptied 2 ms: 4x at most
    check_reachable(table, 0.7, SHAPE)
    with pytest.raises(UserError, match=r"5\.00x speedup, but even emptying every sub-layer runs only 4\.00x faster.*"
                                        r"give rate < 0\.750"):
        check_reachable(table, 0.8, SHAPE)


def test_the_latency_block_reports_the_measured_speedup_and_whether_it_met_the_target():
    table = LatencyTable({}, 1, 1.0, 0.5, (0.0, 1.0), (0, 4), (0.0, 2.0), fit={"r2": 1.0})
    dense = [10.0, 10.5, 9.5, 10.2, 9.9, 10.1]
    pruned = [4.0, 4.2, 3.9, 4.1, 4.0, 4.05]
    pruned_structure = [{"heads": 1, "neurons": 0}]
    block = verify_speedup(None, None, SHAPE, 6, table, 0.6, pruned_structure, times=(dense, pruned))
    low, high = block["speedup_ci"]
    assert block["speedup"] == pytest.approx(block["dense_ms"] / block["pruned_ms"])
    assert low <= block["speedup"] <= high
    assert block["target_speedup"] == pytest.approx(2.5)
    assert block["met"] == (low >= 0.95 * 2.5)
    assert block["predicted_ms"] == pytest.approx(table.predict_ms(pruned_structure))
    assert block["predicted_speedup"] == pytest.approx(table.predict_ms(table.full()) / block["predicted_ms"])
    assert block["speedup_prediction_error"] == pytest.approx(block["predicted_speedup"] / block["speedup"] - 1)
    slow = verify_speedup(None, None, SHAPE, 6, table, 0.8, pruned_structure, times=(dense, pruned))
    assert slow["met"] is False  # 2.5x measured, 5x asked: reported, not hidden
    assert {"runtime", "device", "threads", "batch_size", "seq_len"} <= block.keys()


def test_on_a_quantized_runtime_the_block_adds_the_speedup_over_dense_float32():
    table = LatencyTable({}, 1, 1.0, 0.5, (0.0, 1.0), (0, 4), (0.0, 2.0), fit={"r2": 1.0})
    dense_int8, pruned_int8, dense_float32 = [6.0, 6.2, 5.9, 6.1], [3.0, 3.1, 2.9, 3.0], [12.0, 12.4, 11.8, 12.1]
    shape = RuntimeShape("onnxruntime", torch.device("cpu"), 1, 2, 8, quantize="int8")
    block = verify_speedup(None, None, shape, 4, table, 0.5, [{"heads": 1, "neurons": 0}],
                           times=(dense_int8, pruned_int8, dense_float32))
    assert block["quantize"] == "int8"
    assert block["speedup"] == pytest.approx(6.05 / 3.0)  # what rate asks: int8 over int8
    assert block["dense_float32_ms"] == pytest.approx(12.05)
    assert block["speedup_over_float32"] == pytest.approx(12.05 / 3.0)
    low, high = block["speedup_over_float32_ci"]
    assert low <= block["speedup_over_float32"] <= high and low > block["speedup"]
    plain = verify_speedup(None, None, SHAPE, 4, table, 0.5, [{"heads": 1, "neurons": 0}],
                           times=(dense_int8, pruned_int8))
    assert plain["quantize"] is None and "speedup_over_float32" not in plain


def test_an_int8_table_has_its_own_fingerprint_naming_the_quantization(tiny_model):
    model, settings = tiny_model(), TableSettings()
    float32 = fingerprint(model, RuntimeShape("onnxruntime", torch.device("cpu"), 1, 2, 8), settings)
    int8 = fingerprint(model, RuntimeShape("onnxruntime", torch.device("cpu"), 1, 2, 8, quantize="int8"), settings)
    assert (float32["dtype"], int8["dtype"]) == ("float32", "int8") and "quantization" not in float32
    assert int8["quantization"]["per_channel"] is True and table_path(int8) != table_path(float32)


def test_the_latency_quantizations_are_the_exporters():
    assert LATENCY_QUANTIZATIONS == QUANTIZATIONS  # settings may not import the optional deploy packages


def test_int8_is_timed_on_onnx_runtime_only():
    with pytest.raises(UserError, match="latency.quantize=int8 times ONNX Runtime's quantized models"):
        RuntimeShape("torch", torch.device("cpu"), 1, 2, 8, quantize="int8")
    assert "onnxruntime int8 on cpu" in RuntimeShape("onnxruntime", torch.device("cpu"), 1, 2, 8, "int8").describe()


def test_the_bootstrap_interval_is_deterministic_and_narrows_with_agreeing_rounds():
    dense, pruned = [10.0 + 0.1 * (i % 3) for i in range(30)], [5.0 + 0.05 * (i % 4) for i in range(30)]
    assert bootstrap_interval(dense, pruned) == bootstrap_interval(dense, pruned)
    low, high = bootstrap_interval(dense, pruned)
    assert 1.9 < low <= high < 2.1


@pytest.mark.parametrize(("runtime", "device", "quantize"), [
    ("torch", "cpu", None), ("onnxruntime", "cpu", None), ("onnxruntime", "cpu", "int8"),
    pytest.param("torch", "cuda", None, marks=DEVICES[1].marks)])
def test_real_runtimes_time_the_parts_of_a_tiny_model(tiny_model, runtime, device, quantize):
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    shape = RuntimeShape(runtime, torch.device(device), 1, 2, 8, quantize)
    settings = TableSettings(repeats=3, ffn_step=32, configurations=2, max_error=100.0)  # timing noise: not checked
    table = measure_table(tiny_model(), shape, settings)
    assert len(table.mha_ms) == 5 and table.ffn_widths == (0, 32, 64)
    assert list(table.mha_ms) == sorted(table.mha_ms) and min(table.ffn_ms) == 0.0
    assert table.fit["configurations"] == 4  # timing noise may make the small parts of a tiny model negative:
    assert all(math.isfinite(value) for value in (table.fixed_ms, table.empty_layer_ms, table.scale, table.offset))


@pytest.mark.parametrize("family", FAMILIES + OTHER_FAMILIES)
@pytest.mark.parametrize("head", ["classification", "qa"])
def test_models_of_any_structure_are_built_with_the_familys_code(family, head):
    model = make_tiny_model(family, head)
    structure = [{"heads": 3, "neurons": 17}, {"heads": 0, "neurons": 0}, {"heads": 4, "neurons": 64}]
    built = model_with_structure(model, structure)
    assert type(built).__name__ == type(model).__name__ and get_adapter(built).structure() == structure
    with torch.no_grad():
        outputs = built(**example_inputs(built, 2, 8))
    assert all(torch.isfinite(value).all() for value in outputs.values() if torch.is_tensor(value))
    with pytest.raises(ValueError, match="at least one layer"):
        model_with_structure(model, [])


def test_a_model_pruned_already_is_refused_for_a_latency_table(tiny_model):
    model = tiny_model()
    prune_physically(get_adapter(model), Masks([torch.tensor([1.0, 1, 0, 1])] * 2, [torch.ones(64)] * 2))
    with pytest.raises(UserError, match="layers that are not all full"):
        latency_cost(model, SHAPE, SETTINGS, 0.3)


class Interpolated(LatencyCost):
    """A latency cost that prices every width by interpolation (as before widths were cut to the timed ones)."""

    def priced_width(self, kind: str, kept: int) -> int:
        return kept


def test_a_latency_search_keeps_only_timed_ffn_widths_and_a_flops_search_any():
    # FFN widths timed every 16 neurons; 64 neurons per FFN, 4 heads, 2 layers.
    table = LatencyTable({}, 2, 0.0, 0.0, (0.0, 1.0, 2.0, 3.0, 4.0), (0, 16, 32, 48, 64), (0.0, 1.6, 3.2, 4.8, 6.4))
    cost = LatencyCost(table)
    assert [cost.priced_width("ffn", n) for n in (0, 15, 16, 47, 63, 64)] == [0, 0, 16, 32, 48, 64]
    assert cost.priced_width("mha", 3) == 3 and TINY_FLOPS.priced_width("ffn", 47) == 47
    generator = torch.Generator().manual_seed(0)
    off_grid = 0
    for trial in range(10):
        scores = {s: torch.rand(4 if s % 2 == 0 else 64, generator=generator, dtype=torch.float64) for s in range(4)}
        budget = float(torch.rand(1, generator=generator)) * cost.total(table.full())
        keep, unsnapped = kpms(scores, cost, budget), kpms(scores, Interpolated(table), budget)
        for s in (1, 3):
            kept = int(keep[s].sum())
            assert kept in table.ffn_widths, trial
            # the survivors are the top-scored ones of the sub-layer
            top = torch.argsort(scores[s], descending=True, stable=True)[:kept]
            assert bool(keep[s][top].all())
        assert cost.total([{"heads": int(keep[s].sum()), "neurons": int(keep[s + 1].sum())} for s in (0, 2)]) \
            <= budget + 1e-9
        off_grid += sum(int(unsnapped[s].sum()) % 16 != 0 for s in (1, 3))
    assert off_grid > 0  # a search priced by interpolation keeps any width: the cut above did something


def test_the_additivity_check_draws_ffn_widths_the_table_timed(tiny_model):
    seen = []

    def timer(models):
        seen.extend(layer["neurons"] for model in models for layer in get_adapter(model).structure())
        return fake_timer(additive_ms)(models)
    table = measure_table(tiny_model(), SHAPE, SETTINGS, timer=timer)
    assert set(seen) <= set(table.ffn_widths) and len(set(seen)) > 2


def test_the_float32_ratio_times_the_dense_model_in_float32_and_quantized(tiny_model):
    pytest.importorskip("onnxruntime")
    shape = RuntimeShape("onnxruntime", torch.device("cpu"), 1, 2, 8, quantize="int8")
    model = tiny_model()
    times = time_on_runtimes([(model, shape.float32()), (model, shape), (model, shape)], 4)
    assert [len(rounds) for rounds in times] == [4, 4, 4] and min(min(rounds) for rounds in times) > 0
    ratio = float32_over_quantized(model, shape, 4)
    assert math.isfinite(ratio) and ratio > 0
    assert next(model.parameters()).dtype == torch.float32  # the model timed is left as it was


def test_timing_in_turns_adds_rounds_until_they_fill_the_seconds_asked():
    def call() -> None:
        time.sleep(0.002)

    assert [len(times) for times in time_in_turns([call, call], 3, warmup=1)] == [3, 3]
    longer = time_in_turns([call, call], 3, warmup=1, min_seconds=0.1)  # a round takes about 4 ms
    assert len(longer[0]) == len(longer[1]) and 3 < len(longer[0]) <= 25  # sleeps last at least 2 ms
