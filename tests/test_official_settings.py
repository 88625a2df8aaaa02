"""Each method at its official settings by default: its calibration sample (K-prune 100K tokens,
Kwon et al. 2,048 examples) and its gradient batch per task (32 GLUE, 12 SQuAD); a value given on
the command line wins, and the report records what ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import kprune
from kprune_helpers import make_problem, make_sample, sharpen

from kprune_cli.pruners.common.gradient_batch import official_gradient_batch
from kprune_cli.pruners.kprune.pruner import KPrunePruner
from kprune_cli.pruners.kwon import pruner as kwon_pruner
from kprune_cli.pruners.kwon.pruner import KwonPruner
from kprune_cli.tasks.calibration import CalibrationSample
from kprune_cli.tasks.spec import get_task


@pytest.mark.parametrize("task, hidden, expected", [("mrpc", 384, 32), ("stsb", 768, 32), ("squad", 768, 12),
                                                    ("squad_v2", 384, 12), ("sst2", 1024, 16), ("squad", 1024, 6)])
def test_official_gradient_batch_per_task_and_size(task, hidden, expected):
    assert official_gradient_batch(get_task(task), hidden) == expected


@pytest.mark.parametrize("head, task, official", [("classification", "mrpc", 32), ("qa", "squad", 12)])
def test_kprune_uses_the_tasks_gradient_batch_unless_given(tiny_model, head, task, official):
    model = sharpen(tiny_model(head=head))
    sample = make_sample(model, num=24)
    default = KPrunePruner(tune=False).prune(make_problem(model, task, sample=sample))
    explicit = KPrunePruner(tune=False, gradient_batch=official).prune(make_problem(model, task, sample=sample))
    given = KPrunePruner(tune=False, gradient_batch=5).prune(make_problem(model, task, sample=sample))
    assert default.settings == explicit.settings == {"gradient_batch": official} and given.settings["gradient_batch"] == 5
    for kind in ("heads", "neurons"):
        for ours, theirs in zip(getattr(default.masks, kind), getattr(explicit.masks, kind)):
            assert bool((ours == theirs).all())


@pytest.mark.parametrize("head, task, official", [("classification", "mrpc", 32), ("qa", "squad", 12)])
def test_kwon_uses_the_tasks_gradient_batch_unless_given(tiny_model, head, task, official, monkeypatch):
    model = tiny_model(head=head)
    sizes = []
    original = kwon_pruner.labelled_batches

    def recording(sample, batch_size, device):
        sizes.append(batch_size)
        return original(sample, batch_size, device)

    monkeypatch.setattr(kwon_pruner, "labelled_batches", recording)
    labelled = _labelled(make_sample(model, num=16), head)
    default = KwonPruner(tune=False).prune(make_problem(model, task, sample=labelled))
    given = KwonPruner(tune=False, gradient_batch=5).prune(make_problem(model, task, sample=labelled))
    assert sizes == [official, 5]
    assert default.settings == {"gradient_batch": official} and given.settings == {"gradient_batch": 5}


def _labelled(sample: CalibrationSample, head: str) -> CalibrationSample:
    """The sample with random gold targets of ``head``."""
    for batch in sample.batches:
        size, seq = batch["input_ids"].shape
        if head == "qa":
            batch["start_positions"] = torch.randint(0, seq, (size,))
            batch["end_positions"] = torch.randint(0, seq, (size,))
        else:
            batch["labels"] = torch.randint(0, 2, (size,))
    return sample


def run(checkpoint: Path, data: Path, output: Path, *extra: str) -> int:
    return kprune("run", "task=mrpc", f"model.path={checkpoint}", f"data_dir={data}", f"output_dir={output}",
                  "calibration.batch_size=8", "device=cpu", "rate=0.5", *extra)


def test_each_pruner_draws_its_own_sample_unless_one_is_given(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    assert run(tiny_checkpoint, mrpc_dir, tmp_path / "kwon", "pruner=kwon") == 0
    kwon = json.loads((tmp_path / "kwon" / "report.json").read_text())
    assert kwon["sample"]["asked"] == "calibration.num_examples=2048"
    assert kwon["sample"]["examples"] == kwon["sample"]["windows"] == 48  # the whole tiny train split
    assert any("calibration.num_examples=2048 is more than the train split holds" in note for note in kwon["notes"])
    assert kwon["pruner_settings"] == {"gradient_batch": 32}
    report_md = (tmp_path / "kwon" / "report.md").read_text()
    assert "48 examples" in report_md and "(calibration.num_examples=2048)" in report_md
    assert "Pruner gradient_batch: 32" in report_md
    assert " dense, " in capsys.readouterr().err  # evaluation times on the console, apart from pruning

    assert run(tiny_checkpoint, mrpc_dir, tmp_path / "tokens", "pruner=kwon", "calibration.num_tokens=300",
               "pruner.gradient_batch=4") == 0
    tokens = json.loads((tmp_path / "tokens" / "report.json").read_text())
    assert tokens["sample"]["asked"] == "calibration.num_tokens=300" and 300 <= tokens["sample"]["tokens"] < 400
    assert tokens["config"]["calibration"]["num_examples"] is None
    assert tokens["pruner_settings"] == {"gradient_batch": 4}

    assert run(tiny_checkpoint, mrpc_dir, tmp_path / "magnitude", "pruner=magnitude",
               "calibration.num_examples=10") == 0
    magnitude = json.loads((tmp_path / "magnitude" / "report.json").read_text())
    assert magnitude["sample"]["examples"] == 10 and magnitude["config"]["calibration"]["num_tokens"] is None


@pytest.mark.parametrize("extra, message", [
    (("calibration.num_tokens=300", "calibration.num_examples=20"), "both are set"),
    (("calibration.num_tokens=null",), "neither is set"),
    (("calibration.num_examples=0", "calibration.num_tokens=null"), "calibration.num_examples=0"),
    (("calibration.num_examples=abc",), "calibration.num_examples='abc'"),
])
def test_a_bad_sample_size_is_one_line(tiny_checkpoint, mrpc_dir, tmp_path, capsys, extra, message):
    assert run(tiny_checkpoint, mrpc_dir, tmp_path / "out", "pruner=magnitude", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_kprune_defaults_to_100k_tokens_and_kwon_to_2048_examples(capsys):
    for pruner, tokens, examples in (("kprune", "100000", "null"), ("kwon", "null", "2048"),
                                     ("magnitude", "100000", "null")):
        assert kprune("run", f"pruner={pruner}", "task=mrpc", "--cfg", "job") == 0
        out = capsys.readouterr().out
        calibration = out[out.index("calibration:"):]
        assert f"num_tokens: {tokens}" in calibration and f"num_examples: {examples}" in calibration
    assert kprune("run", "pruner=kwon", "--cfg", "job") == 0  # the demo keeps its small sample
    out = capsys.readouterr().out
    assert "num_tokens: 8000" in out and "num_examples: null" in out


def test_compare_runs_each_pruner_at_its_own_sample(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    out = tmp_path / "compare"
    assert kprune("compare", "task=mrpc", f"model.path={tiny_checkpoint}", f"data_dir={mrpc_dir}", "device=cpu",
                  "pruners=kprune_no_tune,kwon", "rate=0.5", "pruner.tune=false", "calibration.batch_size=8",
                  f"output_dir={out}") == 0
    asked = {report["pruner"]: report["sample"]["asked"]
             for report in map(json.loads, (path.read_text() for path in out.glob("*/report.json")))}
    assert asked == {"kprune_no_tune": "calibration.num_tokens=100000", "kwon": "calibration.num_examples=2048"}
