"""Reliability of ``kprune run``: bad input is a one-line error, numerical faults never reach a saved
model, interrupted runs leave a complete result or a failure record, GPU out-of-memory is retried
with smaller batches, runs are deterministic, and two jobs never share an output directory."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import kprune, make_char_tokenizer, make_tiny_model, write_mrpc_data, write_tiny_checkpoint
from kprune_helpers import DEVICES
from safetensors.torch import load_file
from test_cli import run_args
from transformers import BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from kprune_cli.core.safeguards import prune_with_memory_retry
from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.flops import FlopsModel
from kprune_cli.models.loading import load_model
from kprune_cli.models.masks import Masks
from kprune_cli.pruners.base import PruneProblem, PruneResult
from kprune_cli.runtime import interrupts, locks
from kprune_cli.runtime.interrupts import Terminated, catchable_interrupts, deferred_interrupts
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.locks import STALE_AFTER_S
from kprune_cli.runtime.output_dir import FAILED_NAME, LOCK_NAME, STEPS_NAME, OutputDir
from kprune_cli.tasks.calibration import CalibrationSample
from kprune_cli.tasks.spec import get_task

REPO = Path(__file__).resolve().parents[1]


def assert_clean_user_error(code: int, err: str, expected: str, output: Path) -> None:
    """Exit 2, one error line naming ``expected``, no traceback, nothing left in ``output``."""
    assert code == 2, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], err
    assert not output.exists() or not any(output.iterdir())


# Bad input: config values (test_cli covers rate=1.5/0/abc, device=tpu, unknown task and pruner).
@pytest.mark.parametrize("overrides, expected", [
    (["rate=1"], "rate=1"),
    (["rate=-0.1"], "rate=-0.1"),
    (["rate=nan"], "rate=nan"),
    (["seed=abc"], "seed='abc'"),
    (["seed=1.5"], "seed=1.5"),
    (["seed=-1"], "seed=-1"),
    (["seed='[/red]'"], "seed='[/red]'"),  # rich markup in a value is printed, not interpreted
    (["calibration.num_tokens=0"], "calibration.num_tokens=0"),
    (["calibration.num_tokens=-5"], "calibration.num_tokens=-5"),
    (["calibration.num_tokens=abc"], "calibration.num_tokens='abc'"),
    (["calibration.num_tokens=1.5"], "calibration.num_tokens=1.5"),
    (["calibration.batch_size=0"], "calibration.batch_size=0"),
    (["calibration.seed=x"], "calibration.seed='x'"),
    (["eval_batch_size=0"], "eval_batch_size=0"),
    (["eval_batch_size=-1"], "eval_batch_size=-1"),
    (["eval_batch_size=abc"], "eval_batch_size='abc'"),
    (["overwrite=maybe"], "overwrite='maybe'"),
    (["model.path=???"], "model.path is not set"),
    (["data_dir=${nope}"], "data_dir cannot be resolved"),
    (["pruner=kprune", "pruner.mu=abc"], "pruner.mu='abc'"),
    (["pruner=kprune", "pruner.mu=-1"], "pruner.mu=-1"),
    (["pruner=kprune", "pruner.tune=maybe"], "pruner.tune='maybe'"),
    (["pruner=kprune", "pruner.micro_batch_size=2.5"], "pruner.micro_batch_size=2.5"),
    (["pruner=kwon", "pruner.teacher=5"], "pruner.teacher=5"),
    (["pruner=magnitude", "+pruner.extra=1"], "MagnitudePruner"),
    (["pruner._target_=nope.Pruner"], "nope.Pruner"),
])
def test_bad_config_value_is_one_line_exit_2(overrides, expected, tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    output = tmp_path / "out"
    code = kprune(*run_args(tiny_checkpoint, mrpc_dir, output, *overrides))
    assert_clean_user_error(code, capsys.readouterr().err, expected, output)


def test_unknown_model_config_exits_2(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, tmp_path / "out", "model=nope")) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_exits_2(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    output = tmp_path / "out"
    code = kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "device=cuda"))
    assert_clean_user_error(code, capsys.readouterr().err, "'cuda'", output)


# Bad input: model directories.
def _copy_without(checkpoint: Path, tmp_path: Path, name: str) -> Path:
    copy = Path(shutil.copytree(checkpoint, tmp_path / "copy"))
    (copy / name).unlink()
    return copy


def _damaged_weights(checkpoint: Path, tmp_path: Path, keep: float) -> Path:
    """A copy whose model.safetensors is cut to ``keep`` of its size (0: replaced by junk bytes)."""
    copy = Path(shutil.copytree(checkpoint, tmp_path / "copy"))
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:int(len(data) * keep)] if keep else b"\x07junk" * 100)
    return copy


def _saved(model, tmp_path: Path, tokenizer: bool = True) -> Path:
    directory = tmp_path / "saved"
    model.save_pretrained(directory)
    if tokenizer:
        make_char_tokenizer().save_pretrained(directory)
    return directory


def _with_nan(tmp_path: Path) -> Path:
    model = make_tiny_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    return _saved(model, tmp_path)


MODEL_CASES = {
    "missing": (lambda ck, tmp: tmp / "absent", "does not exist"),
    "a file": (lambda ck, tmp: ck / "config.json", "is a file"),
    "no weights": (lambda ck, tmp: _copy_without(ck, tmp, "model.safetensors"), "holds no weights"),
    "corrupted weights": (lambda ck, tmp: _damaged_weights(ck, tmp, 0), "corrupted or truncated"),
    "truncated weights": (lambda ck, tmp: _damaged_weights(ck, tmp, 0.5), "corrupted or truncated"),
    "no tokenizer": (lambda ck, tmp: _saved(make_tiny_model("bert"), tmp, tokenizer=False), "no tokenizer"),
    "qa head": (lambda ck, tmp: _saved(make_tiny_model("bert", head="qa"), tmp), "ForQuestionAnswering"),
    "3 labels": (lambda ck, tmp: _saved(make_tiny_model("bert", num_labels=3), tmp), "3 output labels"),
    "gpt2": (lambda ck, tmp: _saved(GPT2ForSequenceClassification(
        GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=100, num_labels=2)), tmp), "unsupported architecture"),
    "nan weights": (lambda ck, tmp: _with_nan(tmp), "NaN or infinite"),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_directory_is_one_line_exit_2(case, tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    make_dir, expected = MODEL_CASES[case]
    output = tmp_path / "out"
    code = kprune(*run_args(make_dir(tiny_checkpoint, tmp_path), mrpc_dir, output))
    assert_clean_user_error(code, capsys.readouterr().err, expected, output)


@pytest.mark.parametrize(("command", "module", "key"), [("run", "run", "model.path"),
                                                       ("eval", "evaluate", "checkpoint"),
                                                       ("finetune", "finetune", "model.path")])
def test_a_missing_model_is_named_before_any_data_is_read(command, module, key, tmp_path, capsys, monkeypatch):
    """A model path that does not exist is the error even where the data cannot be read either
    (none given, the hub unreachable): the mistake found without reading anything comes first."""
    def no_data(*args, **kwargs):
        raise AssertionError("data read before the model path was checked")

    monkeypatch.setattr(f"kprune_cli.cli.{module}.load_task_data", no_data)
    output = tmp_path / "out"
    extra = [] if command == "eval" else [f"output_dir={output}"]
    code = kprune(command, "task=mrpc", f"{key}={tmp_path / 'absent'}", "device=cpu", *extra)
    assert_clean_user_error(code, capsys.readouterr().err, "does not exist", output)


def test_the_hub_clients_retry_warnings_are_quiet_during_a_command(tiny_checkpoint, monkeypatch, capsys):
    """Offline, the hub client logged one warning per retried request before our one-line error."""
    huggingface_hub.utils.logging.set_verbosity_warning()
    retry_logger = logging.getLogger("huggingface_hub.utils._http")
    warned = []

    def offline(*args, **kwargs):
        warned.append(retry_logger.isEnabledFor(logging.WARNING))
        raise UserError("cannot load task 'mrpc' (glue/mrpc) from the Hugging Face hub: the hub is unreachable")

    monkeypatch.setattr("kprune_cli.cli.evaluate.load_task_data", offline)
    assert kprune("eval", f"checkpoint={tiny_checkpoint}", "task=mrpc", "device=cpu") == 2
    assert warned == [False]
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: cannot load task 'mrpc'")


# Bad input: data directories.
def _data_with(tmp_path: Path, files: dict[str, str]) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


GOOD_CSV = "sentence1,sentence2,label\ngood day,bad day,1\nfine,poor,0\n"
DATA_CASES = {
    "empty dir": ({}, "no data files for split 'train'"),
    "no validation": ({"train.csv": GOOD_CSV}, "no data files for split 'validation'"),
    "empty train": ({"train.csv": "sentence1,sentence2,label\n", "validation.csv": GOOD_CSV}, "is empty"),
    "wrong columns": ({"train.csv": "text,label\nhello,1\n", "validation.csv": GOOD_CSV}, "lacks column(s)"),
    "not parquet": ({"train.parquet": "not parquet", "validation.csv": GOOD_CSV}, "cannot read"),
    "ragged csv": ({"train.csv": 'sentence1,sentence2,label\n"a,b\nc,d,1,2,3\n', "validation.csv": GOOD_CSV},
                   "cannot read"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_is_one_line_exit_2(case, tiny_checkpoint, tmp_path, capsys):
    files, expected = DATA_CASES[case]
    output = tmp_path / "out"
    code = kprune(*run_args(tiny_checkpoint, _data_with(tmp_path, files), output))
    assert_clean_user_error(code, capsys.readouterr().err, expected, output)


def test_sample_larger_than_train_split_is_noted(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    output = tmp_path / "out"
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "pruner=magnitude",
                            "calibration.num_tokens=1000000")) == 0
    report = json.loads((output / "report.json").read_text())
    assert report["sample"]["examples"] == 48  # the whole train split
    notes = [note for note in report["notes"] if "calibration.num_tokens=1000000" in note]
    assert len(notes) == 1 and f"{report['sample']['tokens']} tokens" in notes[0]
    assert "calibration.num_tokens=1000000" in capsys.readouterr().err


# Numerical faults.
@pytest.fixture
def nan_pruner(monkeypatch):
    """The magnitude pruner, made to leave a NaN in a surviving FFN weight."""
    from kprune_cli.pruners.magnitude.pruner import MagnitudePruner

    original = MagnitudePruner.prune

    def prune(self, problem):
        result = original(self, problem)
        layer = problem.adapter.layers()[0]
        with torch.no_grad():
            layer.ffn_out.weight[0, int(result.masks.neurons[0].nonzero()[0])] = float("nan")
        return result

    monkeypatch.setattr(MagnitudePruner, "prune", prune)


def test_nan_weights_after_pruning_fail_the_run_and_save_nothing(nan_pruner, tiny_checkpoint, mrpc_dir, tmp_path,
                                                                  capsys):
    output = tmp_path / "out"
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "pruner=magnitude")) == 1
    assert "NaN or infinite" in capsys.readouterr().err
    assert sorted(path.name for path in output.iterdir()) == [FAILED_NAME]
    failure = json.loads((output / FAILED_NAME).read_text())
    assert failure["error"].startswith("NonFiniteWeights:") and "layer.0.output.dense.weight" in failure["error"]
    assert failure["config"]["task"]["name"] == "mrpc" and failure["config"]["rate"] == 0.5


@pytest.mark.parametrize("pruner, module", [("kprune", "kprune_cli.pruners.kprune.tune"),
                                            ("kwon", "kprune_cli.pruners.kwon.tune")])
def test_failed_least_squares_leaves_the_sublayer_untuned_and_is_reported(pruner, module, monkeypatch,
                                                                         tiny_checkpoint, mrpc_dir, tmp_path):
    """A solve that fails at every ridge (non-finite system) keeps the sub-layer untuned; the run
    goes on and the report names every such sub-layer."""
    from kprune_cli.pruners.common.lstsq import RidgeSolution

    monkeypatch.setattr(f"{module}.solve_ridge", lambda *args, **kwargs: RidgeSolution(None, 1e-3, 4))
    output = tmp_path / "out"
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, f"pruner={pruner}")) == 0
    notes = json.loads((output / "report.json").read_text())["notes"]
    untuned = [note for note in notes if "failed up to relative ridge" in note]
    assert untuned and all("untuned" in note for note in untuned)


# GPU out-of-memory.
def _forward_that_runs_out_of_memory(monkeypatch, largest: int) -> list[int]:
    """Make every batch of more than ``largest`` sequences raise torch.OutOfMemoryError; returns the
    batch sizes seen."""
    seen = []
    original = BertForSequenceClassification.forward

    def forward(self, input_ids=None, **kwargs):
        seen.append(int(input_ids.shape[0]))
        if input_ids.shape[0] > largest:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(BertForSequenceClassification, "forward", forward)
    return seen


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_out_of_memory_retries_with_smaller_batches(device, monkeypatch, tiny_checkpoint, mrpc_dir,
                                                               tmp_path):
    reference = tmp_path / "reference"
    args = ("pruner=magnitude", "eval_batch_size=16")
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, reference, *args, device=device)) == 0
    seen = _forward_that_runs_out_of_memory(monkeypatch, largest=5)
    output = tmp_path / "out"
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, *args, device=device)) == 0
    assert max(seen) == 16 and {size for size in seen if size <= 5} == {4}  # 16 -> 8 -> 4, the 24 rows in 6 batches
    report, expected = (json.loads((path / "report.json").read_text()) for path in (output, reference))
    assert report["metric"]["all"] == expected["metric"]["all"]
    lowered = [note for note in report["notes"] if "ran out of GPU memory" in note]
    assert [note.rsplit(" ", 1)[-1] for note in lowered] == ["8", "4", "8", "4"]  # dense, then pruned model


def test_out_of_memory_with_single_sequences_fails_the_run(monkeypatch, tiny_checkpoint, mrpc_dir, tmp_path,
                                                           capsys):
    seen = _forward_that_runs_out_of_memory(monkeypatch, largest=0)
    output = tmp_path / "out"
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "pruner=magnitude", "eval_batch_size=2")) == 1
    assert seen == [2, 1] and "OutOfMemoryError" in capsys.readouterr().err
    assert sorted(path.name for path in output.iterdir()) == [FAILED_NAME]


class GreedyPruner:
    """A pruner that corrupts the weights and runs out of memory while its micro-batch > ``fits``."""

    def __init__(self, micro_batch_size: int | None, fits: int) -> None:
        self.micro_batch_size, self.fits, self.weights_seen = micro_batch_size, fits, []

    def micro_batch_of(self, problem: PruneProblem) -> int:
        return self.micro_batch_size or 8

    def prune(self, problem: PruneProblem) -> PruneResult:
        weight = problem.adapter.layers()[0].ffn_out.weight
        self.weights_seen.append(weight.detach().clone())
        with torch.no_grad():
            weight.mul_(3.0)  # tuning in place, before running out of memory
        if self.micro_batch_of(problem) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return PruneResult(masks=Masks.ones(problem.adapter))


@pytest.mark.parametrize("micro_batch_size", [8, None])
def test_pruning_out_of_memory_restarts_with_half_the_batch_and_the_original_weights(micro_batch_size, tiny_model,
                                                                                     monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**40, 2**40))  # the caches fit
    model = tiny_model("bert")
    adapter = get_adapter(model)
    sample = CalibrationSample([{"input_ids": torch.ones(8, 4, dtype=torch.long),
                                 "attention_mask": torch.ones(8, 4, dtype=torch.long)}])
    problem = PruneProblem(model=model, adapter=adapter, task=get_task("mrpc"), sample=sample,
                           flops=FlopsModel(32, 8, 10.0), rate=0.5, device=torch.device("cuda"))
    pruner, notes = GreedyPruner(micro_batch_size, fits=2), []
    prune_with_memory_retry(pruner, problem, notes)
    assert pruner.micro_batch_size == 2 and len(notes) == 2 and "pruner.micro_batch_size=8" in notes[0]
    for seen in pruner.weights_seen[1:]:
        torch.testing.assert_close(seen, pruner.weights_seen[0], rtol=0, atol=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        prune_with_memory_retry(GreedyPruner(micro_batch_size, fits=0), problem, [])


# Determinism.
def test_same_seed_gives_identical_reports_and_weights(tiny_checkpoint, mrpc_dir, tmp_path):
    output = tmp_path / "out"
    runs = []
    for _ in range(2):
        assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "pruner=kprune", "overwrite=true", "seed=3")) == 0
        runs.append((json.loads((output / "report.json").read_text()),
                     load_file(output / "pruned" / "model.safetensors")))
    (first, first_weights), (second, second_weights) = runs
    for key in ("metric", "layers", "flops", "params", "sample", "seed", "config_hash", "versions", "notes"):
        assert first[key] == second[key], key
    assert first["seed"] == 3 and first["config"]["seed"] == 3 and len(first["config_hash"]) == 16
    assert {"kprune", "python", "torch", "transformers", "datasets"} <= set(first["versions"])
    assert first_weights.keys() == second_weights.keys()
    for name, tensor in first_weights.items():
        assert torch.equal(tensor, second_weights[name]), name


# Concurrency and locks.
def test_second_job_on_a_locked_directory_is_refused(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    output = tmp_path / "out"
    holder = OutputDir(output, overwrite=False)
    holder.claim()
    try:
        assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "pruner=magnitude", "overwrite=true")) == 2
        assert "in use" in capsys.readouterr().err
        assert sorted(path.name for path in output.iterdir()) == [LOCK_NAME]
    finally:
        holder.release()


def test_lock_of_a_killed_job_is_reused_only_with_overwrite(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    output = tmp_path / "out"
    output.mkdir()
    (output / LOCK_NAME).write_text(f"{ended.stdout.strip()} {socket.gethostname()}\n")
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "pruner=magnitude")) == 2
    err = capsys.readouterr().err
    assert "killed" in err and "overwrite=true" in err
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "pruner=magnitude", "overwrite=true")) == 0
    assert (output / "report.json").exists() and not (output / LOCK_NAME).exists()


def _foreign_lock(output: Path, age_s: float, job: str | None = None) -> None:
    """A lock written by a job on another host whose last heartbeat was ``age_s`` seconds ago."""
    output.mkdir()
    lock = output / LOCK_NAME
    lock.write_text(json.dumps({"pid": 4242, "host": "other-node", "job": job}) + "\n")
    beat = time.time() - age_s
    os.utime(lock, (beat, beat))


def test_lock_from_another_host_stands_while_it_beats_and_is_stale_after(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    fresh, stale = tmp_path / "fresh", tmp_path / "stale"
    _foreign_lock(fresh, age_s=5)
    _foreign_lock(stale, age_s=STALE_AFTER_S + 1)
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, fresh, "pruner=magnitude", "overwrite=true")) == 2
    err = capsys.readouterr().err
    assert "in use" in err and "other-node" in err and f"{STALE_AFTER_S:.0f} s" in err
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, stale, "pruner=magnitude", "overwrite=true")) == 0
    assert (stale / "report.json").exists() and not (stale / LOCK_NAME).exists()


def test_lock_of_the_same_scheduler_job_is_taken_over_at_once(monkeypatch, tiny_checkpoint, mrpc_dir, tmp_path):
    """A requeued SLURM job (same job id, another node) reclaims its directory without waiting."""
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    output = tmp_path / "out"
    _foreign_lock(output, age_s=1, job="slurm:777")
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "pruner=magnitude", "overwrite=true")) == 0
    monkeypatch.setenv("SLURM_JOB_ID", "778")  # another job's lock, beating: it stands
    other = tmp_path / "other"
    _foreign_lock(other, age_s=1, job="slurm:777")
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, other, "pruner=magnitude", "overwrite=true")) == 2


def test_a_held_lock_beats_until_released(monkeypatch, tmp_path):
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.02)
    output = OutputDir(tmp_path / "out", overwrite=False)
    output.claim()
    lock = output.path / LOCK_NAME
    old = time.time() - 1000
    os.utime(lock, (old, old))
    deadline = time.monotonic() + 30
    while lock.stat().st_mtime == old and time.monotonic() < deadline:
        time.sleep(0.01)
    holder = locks.read_holder(lock)
    assert holder.age_s < 100 and holder.pid == os.getpid() and holder.host == socket.gethostname()
    assert not holder.is_gone()
    output.release()
    assert not lock.exists() and not any(thread.name == "kprune-lock-heartbeat" for thread in threading.enumerate())


# Interruptions.
def wait_for_a_signal(seconds: float = 10.0) -> None:
    """Run bytecodes (where Python calls signal handlers) for up to ``seconds``; a signal sent to this
    process may land in another thread and only then reach the main one, later under load."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


def test_sigterm_becomes_an_interrupt_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    with pytest.raises(Terminated) as caught, catchable_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for_a_signal()
    assert isinstance(caught.value, KeyboardInterrupt) and "SIGTERM" in str(caught.value)
    assert (signal.getsignal(signal.SIGTERM), sys.unraisablehook) == before


class Finalised:
    """An object whose finaliser receives ``signum`` (its handler runs inside ``__del__``)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __del__(self) -> None:
        os.kill(os.getpid(), self.signum)
        sum(range(1000))  # bytecodes, for the handler to run at


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler for the test: a process started in the background (``cmd &``)
    inherits SIGINT ignored, and Python then installs none."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum, expected", [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_interrupt_raised_inside_a_finaliser_is_delivered_again(signum, expected, default_sigint, capsys):
    with pytest.raises(expected), catchable_interrupts():
        Finalised(signum)  # dropped at once: __del__ runs here and Python swallows what it raises
        wait_for_a_signal()
    assert "Exception ignored" not in capsys.readouterr().err


@pytest.mark.parametrize("signum, expected", [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_interrupt_in_code_that_catches_everything_is_raised_when_the_deferral_ends(signum, expected,
                                                                                    default_sigint):
    """What datasets' fingerprinting does (a bare ``except:``) cannot swallow an interrupt held by the deferral."""
    reached_the_end = False
    with pytest.raises(expected), catchable_interrupts():
        with deferred_interrupts():
            try:
                os.kill(os.getpid(), signum)
                wait_for_a_signal(0.3)
            except BaseException:  # noqa: BLE001  (the library's bare except)
                pytest.fail("the interrupt was raised inside the deferred block")
            reached_the_end = True
        pytest.fail("the held interrupt was not raised when the block ended")
    assert reached_the_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_without_a_held_interrupt_the_deferral_changes_nothing():
    with catchable_interrupts(), deferred_interrupts():
        value = sum(range(10))
    assert value == 45


def test_a_block_ending_in_an_error_drops_its_held_interrupt():
    """The job is unwinding already; the interrupt must not surface later, in the next job's data call."""
    with catchable_interrupts():
        with pytest.raises(ValueError), deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for_a_signal(0.3)
            raise ValueError("the data call failed")
        with deferred_interrupts():
            pass  # nothing held any more


@pytest.mark.parametrize("interrupt, code", [(KeyboardInterrupt(), 130), (Terminated("stopped by SIGTERM"), 143)])
def test_interrupt_while_saving_leaves_a_failure_record_only(interrupt, code, monkeypatch, tiny_checkpoint, mrpc_dir,
                                                             tmp_path):
    """Ctrl-C or SIGTERM after the weights are written but before the checkpoint is complete."""
    from kprune_cli.models import checkpoint

    def write_then_stop(model, tokenizer, directory, dtype):
        model.save_pretrained(directory)
        raise interrupt

    monkeypatch.setattr(checkpoint, "_write", write_then_stop)
    output = tmp_path / "out"
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "pruner=magnitude")) == code
    assert sorted(path.name for path in output.iterdir()) == [FAILED_NAME]
    failure = json.loads((output / FAILED_NAME).read_text())
    assert failure["error"].startswith(type(interrupt).__name__) and failure["config"]["task"]["name"] == "mrpc"


@pytest.fixture(scope="module")
def slow_job(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny checkpoint and data large enough that a K-prune run takes a few seconds."""
    root = tmp_path_factory.mktemp("slow")
    return write_tiny_checkpoint(root / "model"), write_mrpc_data(root / "data", 1500, 300)


def slow_args(slow_job: tuple[Path, Path], output: Path) -> list[str]:
    return run_args(*slow_job, output, "pruner=kprune", "calibration.num_tokens=30000")


def check_outcome(output: Path) -> str:
    """The invariant of a run stopped after it took its directory: the complete result, or only the
    failure record (error and config; no pruned/, no lock, no staging). Returns which one."""
    names = sorted(path.name for path in output.iterdir())
    if "report.json" in names:
        assert names == ["pruned", "report.json", "report.md"]
        load_model(str(output / "pruned"), get_task("mrpc"))
        return "complete"
    assert names in ([FAILED_NAME], [STEPS_NAME, FAILED_NAME]), names  # the steps stay for resume=true
    failure = json.loads((output / FAILED_NAME).read_text())
    assert failure["error"].startswith(("KeyboardInterrupt", "Terminated")) and failure["config"]["rate"] == 0.5
    return "failed"


def signal_after_claim(output: Path, signum: int, delay: float) -> threading.Thread:
    """A thread that sends ``signum`` to this process ``delay`` seconds after the job's lock appears,
    if the job still holds it then."""
    def wait_and_send() -> None:
        deadline = time.monotonic() + 60
        while not (output / LOCK_NAME).exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        if (output / LOCK_NAME).exists():
            os.kill(os.getpid(), signum)

    thread = threading.Thread(target=wait_and_send, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def signals_only_inside_the_job(tmp_path):
    """SIGINT interrupts as kprune's own handler does (held inside ``deferred_interrupts``) only while a
    job holds a lock under ``tmp_path``, SIGTERM outside the job is ignored: a late signal cannot stop
    pytest. (kprune installs its handler only over Python's default one, so this one stands in for it;
    one that raised at once would stop the claim half-way, which a real Ctrl-C cannot.)"""
    def holding() -> bool:
        return any(tmp_path.glob(f"*/{LOCK_NAME}"))

    def on_sigint(signum, frame):
        if holding():
            interrupts._interrupt(KeyboardInterrupt())

    previous = signal.signal(signal.SIGINT, on_sigint), signal.signal(signal.SIGTERM, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, previous[0])
    signal.signal(signal.SIGTERM, previous[1])


@pytest.mark.parametrize("signum, delay", [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.35), (signal.SIGINT, 0.6),
                                           (signal.SIGTERM, 1.2), (signal.SIGINT, 2.2), (signal.SIGTERM, 2.6)])
def test_run_stopped_at_any_moment_leaves_a_complete_result_or_a_failure_record(
        signum, delay, slow_job, signals_only_inside_the_job, tmp_path, capsys):
    """Ctrl-C / SIGTERM delivered to this process while ``kprune run`` runs in it, at moments that
    fall in different stages (loading, evaluation, calibration, pruning, saving or after)."""
    output = tmp_path / "out"
    thread = signal_after_claim(output, signum, delay)
    code = kprune(*slow_args(slow_job, output))
    thread.join()
    stopped = {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
    if check_outcome(output) == "failed":
        assert code == stopped and "interrupted" in capsys.readouterr().err
    else:  # finished first; a SIGTERM between the lock's release and the job's return still stops it
        assert code in (0, stopped)


@pytest.mark.slow
def test_real_run_stopped_by_sigterm_cleans_up(slow_job, tmp_path):
    """A real ``python -m kprune_cli run`` process: SIGTERM soon after it took its directory."""
    output = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "kprune_cli", *slow_args(slow_job, output)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (output / LOCK_NAME).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.3)
    process.terminate()
    stderr = process.communicate(timeout=120)[1]
    names = sorted(path.name for path in output.iterdir() if path.name != STEPS_NAME) if output.exists() else None
    assert names == [FAILED_NAME] and process.returncode == 143, (names, process.returncode, stderr)
    assert check_outcome(output) == "failed"
    assert "Traceback" not in stderr and "SIGTERM" in stderr, stderr


@pytest.mark.slow
def test_killed_real_runs_leave_a_complete_result_or_a_failure_record(slow_job, tmp_path):
    """Real ``python -m kprune_cli run`` processes stopped at several moments after they take their
    output directory (whichever stage that hits), and one SIGKILLed run, which cannot clean up."""
    plans = [(signal.SIGINT, 0.05), (signal.SIGTERM, 0.6), (signal.SIGTERM, 1.5), (signal.SIGINT, 3.0),
             (signal.SIGKILL, 0.6)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = []
    for index, (signum, delay) in enumerate(plans):
        output = tmp_path / f"out{index}"
        # SIGINT at its default in the child, even when pytest itself runs in the background (SIGINT ignored).
        process = subprocess.Popen([sys.executable, "-m", "kprune_cli", *slow_args(slow_job, output)], cwd=REPO,
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        jobs.append({"process": process, "output": output, "signal": signum, "delay": delay, "sent": False})
    deadline = time.monotonic() + 150
    while any(job["process"].poll() is None for job in jobs) and time.monotonic() < deadline:
        now = time.monotonic()
        for job in jobs:
            if job["process"].poll() is not None or job["sent"]:
                continue
            if "claimed" not in job and (job["output"] / LOCK_NAME).exists():
                job["claimed"] = now
            if "claimed" in job and now - job["claimed"] >= job["delay"]:
                job["process"].send_signal(job["signal"])
                job["sent"] = True
        time.sleep(0.01)
    outcomes = []
    for job in jobs:
        process = job["process"]
        stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))[1]
        if job["signal"] == signal.SIGKILL:  # no clean-up: the lock stays, report.json's absence tells
            if not (job["output"] / "report.json").exists():
                assert process.returncode == -signal.SIGKILL and (job["output"] / LOCK_NAME).exists()
            if (job["output"] / "pruned").exists():
                load_model(str(job["output"] / "pruned"), get_task("mrpc"))
            continue
        outcome = check_outcome(job["output"])
        outcomes.append(outcome)
        if outcome == "failed":
            assert process.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[job["signal"]], stderr
            assert "Traceback" not in stderr
    assert "failed" in outcomes  # at least one stop landed inside the job
