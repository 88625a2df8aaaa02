"""Deterministic mode, full-float32 passes and their record in the report, and the precision names
(runtime/precision.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import kprune, make_tiny_model
from kprune_helpers import DEVICES, make_problem, make_sample, sharpen
from test_cli import run_args
from test_kwon import labelled

from kprune_cli.config.values import PRECISION_NAMES
from kprune_cli.models.precision import AUTOCAST_DTYPES
from kprune_cli.pruners.kprune import pruner as kprune_module
from kprune_cli.pruners.kprune.pruner import KPrunePruner
from kprune_cli.pruners.kwon.pruner import KwonPruner
from kprune_cli.runtime.precision import (
    CUBLAS_WORKSPACE,
    PRECISIONS,
    deterministic_algorithms,
    full_float32,
    matmul_precision,
    tolerant_determinism,
)


@pytest.fixture
def restore_modes():
    """Put back the process-wide determinism and matmul precision whatever a test did."""
    modes = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    precision, workspace = torch.get_float32_matmul_precision(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(modes[0], warn_only=modes[1])
    torch.set_float32_matmul_precision(precision)
    if workspace is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


def test_deterministic_mode_is_on_inside_and_restored_after(restore_modes, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()


def test_tolerant_determinism_downgrades_an_enforced_mode_and_restores_it(restore_modes):
    torch.use_deterministic_algorithms(True)
    with tolerant_determinism():
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()


def test_full_float32_pins_the_precision_and_restores_it(restore_modes, monkeypatch):
    torch.set_float32_matmul_precision("high")  # what a library turning TF32 on does
    assert matmul_precision() == "high"
    with full_float32():
        assert torch.get_float32_matmul_precision() == "highest"
    assert torch.get_float32_matmul_precision() == "high"
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "1")
    assert "NVIDIA_TF32_OVERRIDE" in matmul_precision()


def test_kprune_measures_in_full_float32_whatever_the_process_setting(restore_modes, monkeypatch):
    seen = []
    measure = kprune_module.measure

    def spy(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return measure(*args, **kwargs)

    monkeypatch.setattr(kprune_module, "measure", spy)
    torch.set_float32_matmul_precision("medium")
    KPrunePruner().prune(make_problem(sharpen(make_tiny_model("bert"))))
    assert seen and set(seen) == {"highest"}
    assert torch.get_float32_matmul_precision() == "medium"


@pytest.mark.parametrize("device", DEVICES)
def test_kwon_runs_where_deterministic_algorithms_are_enforced(restore_modes, device):
    def problem():
        model = sharpen(make_tiny_model("bert"))
        return make_problem(model, sample=labelled(make_sample(model)), device=device)

    free = KwonPruner(gradient_batch=4).prune(problem())
    torch.use_deterministic_algorithms(True)  # raising mode, as transformers' enable_full_determinism sets
    enforced = KwonPruner(gradient_batch=4).prune(problem())
    assert torch.is_deterministic_algorithms_warn_only_enabled() is False
    assert all(torch.equal(a, b) for a, b in zip(free.masks.heads + free.masks.neurons,
                                                 enforced.masks.heads + enforced.masks.neurons))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_run_is_recorded_and_repeats_to_the_bit(device, tiny_checkpoint, mrpc_dir, tmp_path,
                                                             restore_modes):
    outputs = [tmp_path / "a", tmp_path / "b"]
    for output in outputs:
        assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "deterministic=true", device=device)) == 0
    reports = [json.loads((output / "report.json").read_text()) for output in outputs]
    assert reports[0]["numerics"]["deterministic"] is True
    assert reports[0]["layers"] == reports[1]["layers"] and reports[0]["metric"] == reports[1]["metric"]
    weights = [(output / "pruned" / "model.safetensors").read_bytes() for output in outputs]
    assert weights[0] == weights[1]
    assert not torch.are_deterministic_algorithms_enabled()  # the job put the mode back


def test_precision_names_and_their_dtypes_agree():
    assert tuple(PRECISIONS) == PRECISION_NAMES and PRECISIONS["fp32"] is None
    assert AUTOCAST_DTYPES == {"bf16": torch.bfloat16, "fp16": torch.float16}
