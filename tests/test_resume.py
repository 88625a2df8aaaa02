"""Preemption-safe pruning: step checkpoints after each sub-layer, ``resume=true`` continuing a killed run
with the same masks, weights and metrics, a different config refused, and faults while writing."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import kprune, write_mrpc_data, write_tiny_checkpoint
from kprune_helpers import DEVICES, make_problem, sharpen
from safetensors.torch import load_file
from test_cli import run_args

from kprune_cli.pruners.kprune.pruner import KPrunePruner
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.interrupts import catchable_interrupts
from kprune_cli.runtime.locks import read_holder
from kprune_cli.runtime.output_dir import LOCK_NAME, STEPS_NAME
from kprune_cli.runtime.steps import STATE_NAME, StepCheckpoints


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing after it runs (not even the pipeline's clean-up)."""


class KilledAfter(StepCheckpoints):
    """Step checkpoints of a run that dies right after saving sub-layer ``last``."""

    def __init__(self, directory: Path, last: int, pruner: object) -> None:
        super().__init__(directory, {"config_hash": "x", "config": {}, "device": "cpu"})
        self.last_saved = last

    def save(self, state, append_only=()) -> None:
        super().save(state, append_only)
        if state["done"] - 1 == self.last_saved:
            raise Killed


def _pruned(tiny_model, pruner, steps=None, family="bert"):
    problem = make_problem(sharpen(tiny_model(family)), rate=0.6)
    problem.steps = steps
    if steps is not None:
        steps.bind_examples(problem.sample.example_indices)
    result = pruner.prune(problem)
    return result, problem.model.state_dict()


@pytest.mark.parametrize("options", [{}, {"iterative": False}, {"tune": False},
                                     {"selection": "reconstruction", "affine_tuning": True},
                                     {"norm_refit": "moments", "affine_tuning": True},
                                     {"ridge": "auto", "micro_batch_size": 4},
                                     {"autocast": "bf16", "autocast_scope": "all"}])
@pytest.mark.parametrize("killed_after", [0, 1, 2, 3])
def test_resumed_kprune_equals_the_uninterrupted_run(options, killed_after, tiny_model, tmp_path):
    expected, expected_weights = _pruned(tiny_model, KPrunePruner(**options))
    pruner = KPrunePruner(**options)
    with pytest.raises(Killed):
        _pruned(tiny_model, pruner, KilledAfter(tmp_path, killed_after, pruner))
    steps = StepCheckpoints(tmp_path, {"config_hash": "x", "config": {}, "device": "cpu"})
    result, weights = _pruned(tiny_model, KPrunePruner(**options), steps)
    for got, want in zip(result.masks.heads + result.masks.neurons, expected.masks.heads + expected.masks.neurons):
        assert torch.equal(got, want)
    assert weights.keys() == expected_weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, expected_weights[name]), name
    resumed = [note for note in result.notes if note.startswith("resumed at sub-layer")]
    assert resumed == [note for note in resumed if f"sub-layer {killed_after + 1}" in note] and len(resumed) == 1
    assert [note for note in result.notes if note not in resumed] == expected.notes
    if options.get("ridge") == "auto":  # the held-out checks of the sub-layers before the kill were kept
        assert len(result.settings["kpwt_held_out"]) == 4 and any("ridge=auto" in note for note in result.notes)
    files = sorted(path.name for path in (tmp_path / STEPS_NAME).iterdir())
    assert files == sorted([f"step-{s:03d}.safetensors" for s in range(4)] + [STATE_NAME])


@pytest.mark.parametrize("killed_after", [0, 1, 2])
def test_a_resumed_pre_norm_run_with_norm_refit_equals_the_uninterrupted_one(killed_after, tiny_model, tmp_path):
    """Pre-norm: FFN 0's re-fit is of layer 1's input norm, written only once layer 1's teacher sums are
    taken; a run killed in between (after sub-layer 1) must write it at the same point when resumed."""
    expected, expected_weights = _pruned(tiny_model, KPrunePruner(norm_refit="least_squares"), family="modernbert")
    pruner = KPrunePruner(norm_refit="least_squares")
    with pytest.raises(Killed):
        _pruned(tiny_model, pruner, KilledAfter(tmp_path, killed_after, pruner), family="modernbert")
    steps = StepCheckpoints(tmp_path, {"config_hash": "x", "config": {}, "device": "cpu"})
    result, weights = _pruned(tiny_model, KPrunePruner(norm_refit="least_squares"), steps, family="modernbert")
    assert all(torch.equal(got, want) for got, want in zip(result.masks.heads + result.masks.neurons,
                                                           expected.masks.heads + expected.masks.neurons))
    assert all(torch.equal(tensor, expected_weights[name]) for name, tensor in weights.items())
    assert result.settings["norm_refit"] == expected.settings["norm_refit"]


def test_steps_that_cannot_be_written_for_lack_of_space_are_skipped_with_a_note(monkeypatch, tiny_model, tmp_path):
    from kprune_cli.runtime import steps as resume

    expected, expected_weights = _pruned(tiny_model, KPrunePruner())
    real_save = resume.save_file

    def fill_the_disk(tensors, path):  # half the file, then no space left
        real_save(tensors, path)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(resume, "save_file", fill_the_disk)
    pruner = KPrunePruner()
    steps = StepCheckpoints(tmp_path, {"config_hash": "x", "config": {}, "device": "cpu"})
    result, weights = _pruned(tiny_model, pruner, steps)
    assert all(torch.equal(tensor, expected_weights[name]) for name, tensor in weights.items())
    assert result.notes == expected.notes
    assert len(steps.notes()) == 1 and "sub-layers 0, 1, 2, 3" in steps.notes()[0]
    assert "No space left" in steps.notes()[0]
    assert list((tmp_path / STEPS_NAME).iterdir()) == []  # no partial file left to trust
    assert steps.load() is None


def test_a_killed_save_leaves_the_previous_step_valid(monkeypatch, tiny_model, tmp_path):
    """Killed between the step file and the state that counts it: the resume starts one step earlier."""
    from kprune_cli.runtime import steps as resume

    pruner = KPrunePruner()
    with pytest.raises(Killed):
        _pruned(tiny_model, pruner, KilledAfter(tmp_path, 1, pruner))
    real_replace = resume._replace_durably

    def die_before_the_state(staging, target):
        if target.name == STATE_NAME:
            raise Killed
        real_replace(staging, target)

    steps = StepCheckpoints(tmp_path, {"config_hash": "x", "config": {}, "device": "cpu"})
    monkeypatch.setattr(resume, "_replace_durably", die_before_the_state)
    with pytest.raises(Killed):
        _pruned(tiny_model, KPrunePruner(), steps)
    state = json.loads((tmp_path / STEPS_NAME / STATE_NAME).read_text())
    assert state["state"]["done"] == 2 and (tmp_path / STEPS_NAME / "step-002.safetensors").exists()
    monkeypatch.undo()
    expected, expected_weights = _pruned(tiny_model, KPrunePruner())
    result, weights = _pruned(tiny_model, KPrunePruner(), steps)
    assert all(torch.equal(tensor, expected_weights[name]) for name, tensor in weights.items())
    assert any("resumed at sub-layer 2" in note for note in result.notes)


# Real runs killed by SIGKILL (no clean-up at all), then resumed.
KILLING_RUN = """
import os, signal, sys
from pathlib import Path

from kprune_cli.runtime import steps as resume
from kprune_cli.models import checkpoint

where, nth = os.environ["KILL_AT"].split(":")
calls = {"count": 0}


def killed_here(counted: bool) -> None:
    calls["count"] += counted
    if counted and calls["count"] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)


real_replace, real_save, real_write = resume._replace_durably, resume.save_file, checkpoint._write


def replace(staging, target):
    if where == "state-rename":  # the step file is in place, the state that counts it not yet
        killed_here(target.name == resume.STATE_NAME)
    real_replace(staging, target)


def save_file(tensors, path):
    real_save(tensors, path)
    if where == "step-write" and calls["count"] + 1 == int(nth):  # half the step file written
        Path(path).write_bytes(Path(path).read_bytes()[:200])
    killed_here(where == "step-write")


def write(model, tokenizer, directory, dtype):
    model.save_pretrained(directory)  # the weights of pruned/ written, the rest not
    killed_here(where == "pruned")
    real_write(model, tokenizer, directory, dtype)


resume._replace_durably, resume.save_file, checkpoint._write = replace, save_file, write
from kprune_cli.cli.main import main

sys.argv = ["kprune", *sys.argv[1:]]
main()
"""
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(args: list[str], kill_at: str = "none:0") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", KILLING_RUN, *args], cwd=REPO, env={**ENV, "KILL_AT": kill_at},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    stderr = process.communicate(timeout=300)[1]
    return process.returncode, stderr


def _assert_killed(process: subprocess.Popen, output: Path, resumes_at: int) -> None:
    """SIGKILLed: no result, its lock left, and step checkpoints that count ``resumes_at`` sub-layers."""
    code, stderr = _finish(process)
    assert code == -signal.SIGKILL, stderr
    assert not (output / "report.json").exists() and (output / LOCK_NAME).exists()
    assert json.loads((output / STEPS_NAME / STATE_NAME).read_text())["state"]["done"] == resumes_at


def _assert_same_result(output: Path, reference: Path, resumed_at: list[int]) -> None:
    report, expected = (json.loads((path / "report.json").read_text()) for path in (output, reference))
    for key in ("metric", "layers", "flops", "params", "sample", "config_hash"):
        assert report[key] == expected[key], key
    resumed = [note for note in report["notes"] if note.startswith("resumed at sub-layer")]
    assert [int(note.split()[3]) for note in resumed] == resumed_at
    assert [note for note in report["notes"] if note not in resumed] == expected["notes"]
    weights, expected_weights = (load_file(path / "pruned" / "model.safetensors") for path in (output, reference))
    assert weights.keys() == expected_weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, expected_weights[name]), name
    assert sorted(path.name for path in output.iterdir()) == ["pruned", "report.json", "report.md"]


def _reference(args: list[str], output: Path) -> Path:
    """The same run as ``args``, uninterrupted, into ``output``."""
    assert kprune(*[arg for arg in args if not arg.startswith("output_dir=")], f"output_dir={output}") == 0
    return output


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_run_killed_at_three_points_resumes_to_the_uninterrupted_result(device, tiny_checkpoint, mrpc_dir,
                                                                          tmp_path):
    """One real run SIGKILLed three times in a row (while a step's state is renamed into place,
    half-way through writing a step file, while pruned/ is written), resumed each time: it ends
    bit for bit as the uninterrupted run, and its notes say where it resumed (on CUDA with
    deterministic=true, which that promise needs there)."""
    output = tmp_path / "out"
    extra = ["deterministic=true"] if device == "cuda" else []
    args = run_args(tiny_checkpoint, mrpc_dir, output, "pruner=kprune", *extra, device=device)
    for kill_at, resumes_at in (("state-rename:2", 1), ("step-write:2", 2), ("pruned:1", 4)):
        extra = ["resume=true"] if kill_at != "state-rename:2" else []
        _assert_killed(_start(args + extra, kill_at), output, resumes_at)
    code, stderr = _finish(_start(args + ["resume=true"]))
    assert code == 0, stderr
    _assert_same_result(output, _reference(args, tmp_path / "reference"), resumed_at=[1, 2, 4])


@pytest.mark.slow
def test_a_run_killed_from_outside_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL from outside at whatever moment the run has saved its first step."""
    job = write_tiny_checkpoint(tmp_path / "model"), write_mrpc_data(tmp_path / "data", 1500, 300)
    output = tmp_path / "out"
    args = run_args(*job, output, "pruner=kprune", "calibration.num_tokens=30000")
    process, state = _start(args), output / STEPS_NAME / STATE_NAME
    deadline = time.monotonic() + 240
    while process.poll() is None and not state.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.kill()
    _finish(process)
    done = json.loads(state.read_text())["state"]["done"]
    assert 1 <= done < 4 and not (output / "report.json").exists()
    code, stderr = _finish(_start(args + ["resume=true"]))
    assert code == 0, stderr
    _assert_same_result(output, _reference(args, tmp_path / "reference"), resumed_at=[done])


# resume=true through the command line, in this process.
def _interrupted(args: list[str], output: Path, monkeypatch, capsys, after: int = 1) -> None:
    """Run ``args`` until it has saved the step of sub-layer ``after``, then stop it as an error would."""
    from kprune_cli.runtime import steps as resume

    real_save = StepCheckpoints.save

    def save_then_fail(self, state, append_only=()):
        real_save(self, state, append_only)
        if state["done"] - 1 == after:
            raise RuntimeError("stopped for the test")

    monkeypatch.setattr(resume.StepCheckpoints, "save", save_then_fail)
    assert kprune(*args) == 1
    monkeypatch.undo()
    assert f"{after + 1} finished sub-layers are kept" in capsys.readouterr().err  # and how to go on
    assert sorted(path.name for path in output.iterdir()) == [STEPS_NAME, "FAILED.json"]


def test_resume_with_another_config_is_refused_in_one_line(tiny_checkpoint, mrpc_dir, tmp_path, monkeypatch, capsys):
    output = tmp_path / "out"
    args = run_args(tiny_checkpoint, mrpc_dir, output, "pruner=kprune")
    _interrupted(args, output, monkeypatch, capsys)
    assert kprune(*args, "resume=true", "rate=0.6", "pruner.mu=32") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another config" in errors[0]
    assert "rate=0.5 there, 0.6 here" in errors[0] and "pruner.mu=64.0 there, 32 here" in errors[0]
    assert sorted(path.name for path in output.iterdir()) == [STEPS_NAME, "FAILED.json"]  # untouched
    assert kprune(*args) == 2  # without resume=true: refused as before, with a hint
    assert "resume=true" in capsys.readouterr().err
    assert kprune(*args, "resume=true") == 0
    assert not (output / STEPS_NAME).exists() and not (output / "FAILED.json").exists()


def test_resume_on_an_empty_or_finished_output_dir(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    output = tmp_path / "out"
    args = run_args(tiny_checkpoint, mrpc_dir, output, "pruner=kprune", "resume=true")
    assert kprune(*args) == 0  # nothing to resume: simply runs
    report = json.loads((output / "report.json").read_text())
    assert not any(note.startswith("resumed") for note in report["notes"])
    stamp = (output / "report.json").stat().st_mtime_ns
    capsys.readouterr()
    assert kprune(*args) == 0  # a requeued job that had finished: leaves the result as it is
    assert "nothing to resume" in capsys.readouterr().err
    assert (output / "report.json").stat().st_mtime_ns == stamp


def test_pruners_without_steps_restart_under_resume(tiny_checkpoint, mrpc_dir, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "FAILED.json").write_text("{}\n")  # what an interrupted magnitude run leaves
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "pruner=magnitude", "resume=true")) == 0
    notes = json.loads((output / "report.json").read_text())["notes"]
    assert any("pruner=magnitude keeps no step checkpoints" in note for note in notes)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")  # not a kprune run's leftovers: refused
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, other, "pruner=magnitude", "resume=true")) == 2


# Clusters: a preempted sweep job is requeued with resume=true (hydra-submitit-launcher).
needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher is not installed (pip install -e .[cluster])",
)


@needs_submitit
def test_preempted_or_slurm_requeued_jobs_come_back_with_resume(monkeypatch):
    from hydra_plugins.kprune_launchers.resuming import ResumingSlurmLauncher

    # The class it derives from (Hydra's plugin scan may have run the plugin's module again since).
    base = next(cls for cls in ResumingSlurmLauncher.__mro__ if cls.__name__ == "BaseSubmititLauncher")

    launcher = ResumingSlurmLauncher()
    requeued = launcher.checkpoint(["rate=0.5", "resume=false"], "hydra.sweep.dir", 3, "job_id_for_3", {})
    assert requeued.function is launcher and requeued.args == (["rate=0.5", "resume=true"], "hydra.sweep.dir", 3,
                                                                "job_id_for_3", {})
    calls = []
    monkeypatch.setattr(base, "__call__", lambda self, overrides, *args: calls.append(overrides))
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    launcher(["rate=0.5"], "hydra.sweep.dir", 0, "job_id_for_0", {})
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM requeued it by itself (after SIGKILL)
    launcher(["rate=0.5"], "hydra.sweep.dir", 0, "job_id_for_0", {})
    assert calls == [["rate=0.5"], ["rate=0.5", "resume=true"]]


@needs_submitit
def test_sigterm_is_left_to_submitit_in_its_jobs():
    from submitit.core.job_environment import SignalHandler

    handler = SignalHandler(None, None, None).bypass  # what submitit installs: SIGTERM ignored
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with catchable_interrupts():
            assert signal.getsignal(signal.SIGTERM) == handler
        assert signal.getsignal(signal.SIGTERM) == handler
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with catchable_interrupts():
            assert signal.getsignal(signal.SIGTERM) not in (handler, signal.SIG_DFL)
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow  # two submitit processes import torch, and the job runs twice
@needs_submitit
def test_local_launcher_job_preempted_by_submitits_signal_resumes_by_itself(tmp_path):
    """submitit's local executor, the job sent submitit's preemption signal once it has saved a step:
    submitit requeues it, it resumes and ends as an uninterrupted run."""
    from submitit.core.job_environment import JobEnvironment

    job = write_tiny_checkpoint(tmp_path / "model"), write_mrpc_data(tmp_path / "data", 1500, 300)
    sweep = tmp_path / "sweep"
    args = run_args(*job, sweep, "pruner=kprune", "calibration.num_tokens=30000")
    sweep_run = subprocess.Popen([sys.executable, "-m", "kprune_cli", *args, "-m", "hydra/launcher=local"],
                                 cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    output = sweep / "0-mrpc-kprune-r0.5-s0"
    deadline = time.monotonic() + 300
    while sweep_run.poll() is None and not (output / STEPS_NAME / STATE_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    holder = read_holder(output / LOCK_NAME)
    os.kill(holder.pid, JobEnvironment._usr_sig())  # what SLURM sends a preempted job
    code, stderr = _finish(sweep_run)
    assert code == 0, stderr
    logs = "".join(path.read_text() for path in sorted((sweep / ".submitit").rglob("*_log.*")))
    assert "this job is preempted" in logs and "Requeued job" in logs
    report = json.loads((output / "report.json").read_text())
    resumed_at = [int(note.split()[3]) for note in report["notes"] if note.startswith("resumed at sub-layer")]
    assert len(resumed_at) == 1 and report["config"]["resume"] is True
    _assert_same_result(output, _reference(args, tmp_path / "reference"), resumed_at=resumed_at)


# Faults while writing.
def test_full_disk_while_saving_pruned_is_one_line_and_resume_finishes(monkeypatch, tiny_checkpoint, mrpc_dir,
                                                                       tmp_path, capsys):
    from kprune_cli.models import checkpoint

    real_write = checkpoint._write

    def fill_the_disk(model, tokenizer, directory, dtype):
        model.save_pretrained(directory)
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "tokenizer.json"))

    monkeypatch.setattr(checkpoint, "_write", fill_the_disk)
    output = tmp_path / "out"
    args = run_args(tiny_checkpoint, mrpc_dir, output, "pruner=kprune")
    assert kprune(*args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "resume=true" in errors[0]
    assert sorted(path.name for path in output.iterdir()) == [STEPS_NAME]  # no pruned/, no staging, no lock
    monkeypatch.setattr(checkpoint, "_write", real_write)  # space freed
    assert kprune(*args, "resume=true") == 0
    _assert_same_result(output, _reference(args, tmp_path / "reference"), resumed_at=[4])


def test_unwritable_output_dir_is_one_line(monkeypatch, tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    """As root (or on a filesystem that lies to access()), the refusal comes when the lock is made."""
    from kprune_cli.runtime import locks

    def refused(source, target):
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr(locks.os, "link", refused)
    output = tmp_path / "out"
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "pruner=magnitude")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Permission denied" in errors[0] and f"output_dir={output}" in errors[0]
    assert not output.exists() or not any(output.iterdir())
    monkeypatch.undo()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # checked before Hydra makes the directory
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, tmp_path / "new" / "out", "pruner=magnitude")) == 2
    assert "is not writable" in capsys.readouterr().err and not (tmp_path / "new").exists()


BUILDER = """
import os, sys, time
from pathlib import Path
from kprune_cli.tasks.demo import build_once

target, log, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]


def build(staging):
    with log.open("a") as record:
        record.write("built\\n")
    (staging / "model.safetensors").write_bytes(b"half")  # then, killed: half-written
    time.sleep(60 if mode == "hang" else 1.0)
    (staging / "model.safetensors").write_bytes(b"complete")


go = log.with_name("go")  # two builders start building together
log.with_name(f"ready-{mode}-{os.getpid()}").touch()
while mode == "build" and not go.exists():
    time.sleep(0.01)
build_once(target, build)
"""


def _builder(target: Path, log: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(target), str(log), mode], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_demo_cache_killed_while_prepared_is_rebuilt_and_two_builders_take_turns(tmp_path):
    target, log = tmp_path / "cache" / "minilm-demo", tmp_path / "builds.log"
    killed = _builder(target, log, "hang")
    deadline = time.monotonic() + 120
    while not list(target.parent.glob(".minilm-demo.*.partial/model.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.kill()
    killed.communicate()
    assert not target.exists() and list(target.parent.glob(".minilm-demo.*.partial"))  # half-written, not used
    first, second = _builder(target, log, "build"), _builder(target, log, "build")  # two sweep jobs at once
    while len(list(tmp_path.glob("ready-build-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outputs = [process.communicate(timeout=120) for process in (first, second)]
    assert first.returncode == second.returncode == 0, outputs
    assert log.read_text() == "built\n" * 2  # the killed build, then one of the two: the other waited
    assert any("waiting for another kprune process" in err for _, err in outputs)
    assert (target / "model.safetensors").read_bytes() == b"complete"
    assert sorted(path.name for path in target.parent.iterdir()) == [".minilm-demo.lock", "minilm-demo"]


def test_full_disk_while_preparing_the_demo_cache_is_one_line(tmp_path):
    from kprune_cli.tasks.demo import build_once

    def fill_the_disk(staging: Path) -> None:
        (staging / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "cache" / "minilm-demo"
    with pytest.raises(UserError, match="No space left on device; set KPRUNE_CACHE"):
        build_once(target, fill_the_disk)
    assert sorted(path.name for path in target.parent.iterdir()) == [".minilm-demo.lock"]


def test_kprune_state_dict_continues_an_interrupted_prune_without_a_store(tiny_model):
    """The pruner's own contract: ``load_state_dict(state_dict())`` on a fresh model continues to the
    uninterrupted result (the store only keeps that state)."""
    expected, expected_weights = _pruned(tiny_model, KPrunePruner())

    def stop_after_first(sublayer, masks):
        if sublayer == 1:
            raise Killed

    interrupted = KPrunePruner()
    problem = make_problem(sharpen(tiny_model("bert")), rate=0.6)
    with pytest.raises(Killed):
        interrupted.prune(problem, on_step=stop_after_first)
    state = interrupted.state_dict()
    assert state["done"] == 2 and set(state["tuned"]) == {"0", "1"} and set(state["masks"]) == {"heads", "neurons"}
    pruner = KPrunePruner()
    pruner.load_state_dict(state)
    result, weights = _pruned(tiny_model, pruner)
    for got, want in zip(result.masks.heads + result.masks.neurons, expected.masks.heads + expected.masks.neurons):
        assert torch.equal(got, want)
    assert all(torch.equal(tensor, expected_weights[name]) for name, tensor in weights.items())


def test_step_checkpoints_of_an_older_kprune_are_refused_in_one_line(tmp_path):
    (tmp_path / STEPS_NAME).mkdir()
    (tmp_path / STEPS_NAME / STATE_NAME).write_text(json.dumps({"version": 1, "done": 2, "batch_size": 32}))
    steps = StepCheckpoints(tmp_path, {"config_hash": "x", "config": {}, "device": "cpu"})
    with pytest.raises(UserError, match="written by an older kprune; start again with overwrite=true"):
        steps.check_resumable()
    assert steps.saved_steps() == 0


def test_append_only_tensors_are_written_once(tmp_path):
    steps = StepCheckpoints(tmp_path, {"config_hash": "x", "config": {}, "device": "cpu"})
    first = {"layer": torch.ones(3)}
    steps.save({"done": 1, "mask": torch.zeros(2), "tuned": {"0": first}}, append_only=("tuned",))
    steps.save({"done": 2, "mask": torch.ones(2), "tuned": {"0": {"layer": torch.full((3,), 7.0)},
                                                             "1": {"layer": torch.arange(3.0)}}},
               append_only=("tuned",))
    assert sorted(load_file(tmp_path / STEPS_NAME / "step-001.safetensors")) == ["mask", "tuned.1.layer"]
    state = steps.load()
    assert state["done"] == 2 and torch.equal(state["mask"], torch.ones(2))
    assert torch.equal(state["tuned"]["0"]["layer"], torch.ones(3))  # as first saved: promised unchanged
    assert torch.equal(state["tuned"]["1"]["layer"], torch.arange(3.0))


def test_a_resume_keeps_the_micro_batch_the_interrupted_run_used(tiny_model, tmp_path):
    """An out-of-memory retry lowered the micro-batch before the kill: the resumed run uses it again (its
    sums then match the saved steps'), and says so."""
    expected, expected_weights = _pruned(tiny_model, KPrunePruner(micro_batch_size=4))
    lowered = KPrunePruner(micro_batch_size=4)
    with pytest.raises(Killed):
        _pruned(tiny_model, lowered, KilledAfter(tmp_path, 1, lowered))
    pruner = KPrunePruner()  # as configured: 32
    result, weights = _pruned(tiny_model, pruner, StepCheckpoints(tmp_path, {"config_hash": "x", "config": {},
                                                                             "device": "cpu"}))
    assert pruner.micro_batch_size == 4
    assert any(note.startswith("resumed with pruner.micro_batch_size=4") and "configured: 32" in note
               for note in result.notes)
    assert all(torch.equal(tensor, expected_weights[name]) for name, tensor in weights.items())
