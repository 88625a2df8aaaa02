"""Native half-precision detection, and the note K-prune leaves when autocast would only be emulated."""

from __future__ import annotations

import pytest
import torch
from conftest import kprune
from kprune_helpers import make_problem, make_sample, sharpen

from kprune_cli.pruners.kprune.pruner import KPrunePruner
from kprune_cli.runtime import hardware


@pytest.fixture
def flags(monkeypatch):
    """Set the CPU flags that :func:`hardware.native_matmul` sees."""
    def use(*names: str) -> None:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(names))
    return use


@pytest.mark.parametrize("present, bf16, fp16", [
    (("avx2", "fma"), False, False),
    (("avx512f", "avx512_bf16"), True, False),
    (("avx512f", "amx_tile", "amx_bf16"), True, False),
    (("amx_bf16", "amx_fp16"), True, True),
])
def test_native_matmul_reads_the_cpu_flags(flags, present, bf16, fp16):
    flags(*present)
    cpu = torch.device("cpu")
    assert hardware.native_matmul(cpu, torch.bfloat16) is bf16
    assert hardware.native_matmul(cpu, torch.float16) is fp16


def test_cpu_flags_of_this_machine_are_read():
    flags = hardware.cpu_flags()
    assert not flags or "sse2" in flags or "fpu" in flags  # x86 Linux lists these; elsewhere: none


@pytest.mark.parametrize("native", [False, True])
def test_kprune_notes_an_emulated_autocast(tiny_model, flags, native):
    flags("avx2", *(("amx_bf16",) if native else ()))
    model = sharpen(tiny_model("bert"))
    result = KPrunePruner(autocast="bf16").prune(make_problem(model, rate=0.5, sample=make_sample(model, num=8)))
    emulated = [note for note in result.notes if "no native bf16" in note]
    assert len(emulated) == (0 if native else 1)
    if not native:
        assert "pruner.autocast=false" in emulated[0]


@pytest.mark.parametrize("native", [False, True])
def test_kprune_run_warns_before_the_work_when_autocast_would_be_emulated(flags, native, tiny_checkpoint, mrpc_dir,
                                                                         tmp_path, capsys):
    flags("avx2", *(("avx512_bf16",) if native else ()))
    assert kprune("run", "task=mrpc", f"model.path={tiny_checkpoint}", f"data_dir={mrpc_dir}", "device=cpu",
                  f"output_dir={tmp_path / 'out'}", "calibration.num_tokens=300", "rate=0.5",
                  "pruner.autocast=bf16") == 0
    printed = capsys.readouterr().err
    warning = [line for line in printed.splitlines() if "warning:" in line]
    assert len(warning) == (0 if native else 1)
    if not native:  # after the device line, before the pruning's progress
        assert printed.index("device:") < printed.index("warning:") < printed.index("K-prune")
        assert "no native bf16" in warning[0]


def test_kprune_in_float32_leaves_no_precision_note(tiny_model, flags):
    flags("avx2")
    model = sharpen(tiny_model("bert"))
    result = KPrunePruner().prune(make_problem(model, rate=0.5, sample=make_sample(model, num=8)))
    assert not any("autocast" in note for note in result.notes)


def test_the_device_line_names_the_gpu_or_the_cpu(monkeypatch, flags):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Fake 80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert hardware.describe_device(torch.device("cuda", 1)) == "cuda:1 (NVIDIA Fake 80GB, bf16 emulated)"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert hardware.describe_device(torch.device("cuda", 0)).endswith("bf16 native)")
    flags("avx512_bf16")
    line = hardware.describe_device(torch.device("cpu"))
    assert line.startswith(f"cpu ({hardware.cpu_model()}, {torch.get_num_threads()} threads") and "bf16 native" in line


def test_float64_is_fast_on_cpus_and_datacenter_gpus_only(monkeypatch):
    assert hardware.fast_float64(torch.device("cpu"))
    for capability, fast in (((8, 0), True), ((9, 0), True), ((8, 6), False), ((8, 9), False), ((7, 5), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert hardware.fast_float64(torch.device("cuda", 0)) is fast
