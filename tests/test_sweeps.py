"""Sweeps end to end on tiny models: ``kprune run -m``, failed jobs, launchers, ``kprune compare``."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import matplotlib.image
import pytest
from conftest import kprune

needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher is not installed (pip install -e .[cluster])",
)


def job_args(checkpoint: Path, data: Path, *extra: str) -> list[str]:
    return ["task=mrpc", f"model.path={checkpoint}", f"data_dir={data}", "calibration.num_tokens=300",
            "calibration.batch_size=8", "device=cpu", *extra]


def reports(directory: Path) -> dict[str, dict]:
    return {path.parent.name: json.loads(path.read_text()) for path in directory.glob("*/report.json")}


def test_multirun_grid_writes_one_directory_per_job(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    args = job_args(tiny_checkpoint, mrpc_dir, "pruner=kprune,magnitude", "rate=0.4,0.6", f"output_dir={sweep}")
    assert kprune("run", "-m", *args) == 0

    found = reports(sweep)
    assert sorted(found) == ["0-mrpc-kprune-r0.4-s0", "1-mrpc-kprune-r0.6-s0",
                             "2-mrpc-magnitude-r0.4-s0", "3-mrpc-magnitude-r0.6-s0"]
    for name, report in found.items():
        assert name.endswith(f"-{report['pruner']}-r{report['rate']}-s0")
        assert report["config"]["output_dir"] == str(sweep / name)
        assert report["checkpoint"]["path"] == str(sweep / name / "pruned")
        # Hydra writes nothing of its own (.hydra/, logs) into a job's directory.
        assert sorted(path.name for path in (sweep / name).iterdir()) == ["pruned", "report.json", "report.md"]
    assert sorted(path.name for path in sweep.iterdir() if path.is_file()) == ["multirun.yaml"]
    # The same seed draws the same calibration sample for every job.
    assert len({(r["sample"]["examples"], r["sample"]["tokens"]) for r in found.values()}) == 1


def test_single_run_default_directory(tiny_checkpoint, mrpc_dir, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert kprune("run", *job_args(tiny_checkpoint, mrpc_dir, "pruner=magnitude", "rate=0.5")) == 0
    runs = list((work / "outputs" / "mrpc").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("magnitude-r0.5-s0-")
    assert (runs[0] / "report.json").exists()
    assert [path.name for path in work.iterdir()] == ["outputs"]


def test_failed_job_is_recorded_and_the_sweep_goes_on(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    args = job_args(tiny_checkpoint, mrpc_dir, "pruner=magnitude", "rate=1.5,0.5", f"output_dir={sweep}")
    # -m may stand anywhere among the overrides (Hydra itself wants it first).
    assert kprune("run", *args[:3], "-m", *args[3:]) == 1  # a sweep with a failed job exits 1, after all jobs ran

    failed = json.loads((sweep / "0-mrpc-magnitude-r1.5-s0" / "FAILED.json").read_text())
    assert failed["error"].startswith("UserError: rate=1.5 is out of range")
    assert failed["config"]["rate"] == 1.5
    assert (sweep / "1-mrpc-magnitude-r0.5-s0" / "report.json").exists()
    err = capsys.readouterr().err
    assert "failed:" in err and "0-mrpc-magnitude-r1.5-s0" in err and "Traceback" not in err

    assert kprune("summarize", str(sweep)) == 0
    summary = json.loads((sweep / "summary.json").read_text())
    assert [row["rate"] for row in summary["rows"]] == [0.5]
    assert [Path(run["path"]).name for run in summary["failed"]] == ["0-mrpc-magnitude-r1.5-s0"]


def test_compare_writes_one_row_per_pruner_and_rate(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    out = tmp_path / "compare"
    args = job_args(tiny_checkpoint, mrpc_dir, "pruners=kprune_no_tune,magnitude", "rate=0.4,0.6",
                    f"output_dir={out}")
    assert kprune("compare", *args) == 0
    assert "# kprune summary" in capsys.readouterr().out

    with (out / "summary.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["pruner"], float(row["rate"])) for row in rows] == [
        ("kprune_no_tune", 0.4), ("kprune_no_tune", 0.6), ("magnitude", 0.4), ("magnitude", 0.6)]
    found = {name.split("-", 1)[1]: report for name, report in reports(out).items()}  # without the job number
    for row in rows:
        report = found[f"mrpc-{row['pruner']}-r{row['rate']}-s0"]
        assert float(row["metric_mean"]) == pytest.approx(report["metric"]["pruned"])
        assert float(row["flops_reduction_mean"]) == pytest.approx(report["flops"]["reduction"])
        assert float(row["prune_seconds_mean"]) == pytest.approx(report["timing"]["prune"])
    assert json.loads((out / "summary.json").read_text())["failed"] == []
    assert (out / "summary.md").read_text().startswith("# kprune summary")
    assert matplotlib.image.imread(out / "plot-mrpc-tiny-bert-mrpc.png").shape[0] >= 400


def test_compare_with_an_unknown_pruner_exits_2(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    args = job_args(tiny_checkpoint, mrpc_dir, "pruners=magnitude,nope", f"output_dir={tmp_path / 'c'}")
    assert kprune("compare", *args) == 2
    assert "nope" in capsys.readouterr().err


@needs_submitit
def test_slurm_launcher_config_composes(capsys):
    assert kprune("run", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30",
                  "--cfg", "hydra") == 0
    out = capsys.readouterr().out
    for line in ("_target_: hydra_plugins.kprune_launchers.resuming.ResumingSlurmLauncher",
                 "partition: gpu", "timeout_min: 30", "gpus_per_node: 1", "mem_gb: 32"):
        assert line in out
    assert kprune("run", "hydra/launcher=slurm", "hydra.launcher.partiton=gpu", "--cfg", "hydra") == 2  # typo


@pytest.mark.slow  # two fresh Python processes import torch: ~25 s on 2 cores
@needs_submitit
def test_local_launcher_runs_jobs_in_other_processes(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    args = job_args(tiny_checkpoint, mrpc_dir, "hydra/launcher=local", "pruner=magnitude", "rate=0.5,1.5",
                    f"output_dir={sweep}")
    assert kprune("run", "-m", *args) == 1
    assert reports(sweep)["0-mrpc-magnitude-r0.5-s0"]["rate"] == 0.5
    assert (sweep / "1-mrpc-magnitude-r1.5-s0" / "FAILED.json").exists()
    assert "1-mrpc-magnitude-r1.5-s0" in capsys.readouterr().err
    assert list((sweep / ".submitit").glob("*/*_log.out"))  # the jobs ran in submitit's processes
