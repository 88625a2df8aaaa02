"""Sweeps on a real SLURM (issue #22): a one-node cluster on this machine (tests/slurm_cluster.py),
the sweeps submitted by the installed ``kprune`` console script from a directory outside the
repository, as a user would. Marked ``slurm`` (``make test-slurm``; ``make test`` leaves them out);
they skip where the cluster cannot start (SLURM or munge not installed, not root)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_mrpc_data, write_tiny_checkpoint
from slurm_cluster import PARTITION, ClusterUnavailable, SlurmCluster, start_cluster
from test_resume import _assert_same_result, _reference

from kprune_cli.runtime.output_dir import STEPS_NAME
from kprune_cli.runtime.steps import STATE_NAME

KPRUNE = Path(sys.executable).with_name("kprune")
HOOKS = Path(__file__).resolve().parent / "slurm_hooks"  # sitecustomize.py: KPRUNE_TEST_STEP_PAUSE

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not KPRUNE.exists(), reason=f"no kprune console script beside {sys.executable}"),
    pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                       reason="hydra-submitit-launcher is not installed (pip install -e .[cluster])"),
]

# The cluster has 2 CPUs and no GPU: one CPU and a little memory per job.
SLURM = ["hydra/launcher=slurm", f"hydra.launcher.partition={PARTITION}", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=20", "device=cpu"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> SlurmCluster:
    try:
        running = start_cluster(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as reason:
        pytest.skip(f"no SLURM test cluster: {reason}")
    yield running
    running.stop()


@pytest.fixture
def idle(cluster: SlurmCluster) -> SlurmCluster:
    """The cluster with no job left of an earlier test."""
    cluster.wait_idle()
    return cluster


def sweep_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    """The submitting shell: this cluster's SLURM_CONF, no PYTHONPATH of the repository (only the test
    hooks), one thread per job (the reference runs compare bit for bit)."""
    env = {key: value for key, value in cluster.env.items() if key not in ("PYTHONPATH", "SLURM_JOB_ID")}
    return {**env, "PYTHONPATH": str(HOOKS), "OMP_NUM_THREADS": "1", **extra}


def submit(cluster: SlurmCluster, work: Path, *args: str, **env: str) -> subprocess.Popen:
    """``kprune run -m <args>`` on the cluster, from ``work`` (its output in ``work/sweep.log``)."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "sweep.log", "w") as log:
        return subprocess.Popen([str(KPRUNE), "run", "-m", *SLURM, *args], cwd=work, env=sweep_env(cluster, **env),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)


def finish(process: subprocess.Popen, work: Path, cluster: SlurmCluster, timeout: float = 420) -> tuple[int, str]:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"the sweep did not end in {timeout:.0f} s; squeue: {cluster.job_states()}\n"
                    f"{(work / 'sweep.log').read_text()[-4000:]}\n{cluster.logs()}")
    return process.returncode, (work / "sweep.log").read_text()


def job_logs(sweep: Path) -> str:
    return "".join(f"--- {path}\n{path.read_text(errors='replace')}"
                   for path in sorted((sweep / ".submitit").rglob("*_log.*")))


def test_the_readme_sweep_on_slurm_then_summarize(idle, tmp_path):
    """The README's cluster sweep, on the offline demo (packaged MiniLM, generated task) at two rates."""
    work = tmp_path / "work"
    code, log = finish(submit(idle, work, "preset=smoke", "rate=0.4,0.6", "output_dir=sweeps/demo"), work, idle)
    sweep = work / "sweeps" / "demo"
    assert code == 0, log + job_logs(sweep)
    reports = {path.parent.name: json.loads(path.read_text()) for path in sweep.glob("*/report.json")}
    assert sorted(reports) == ["0-demo-kprune-r0.4-s0", "1-demo-kprune-r0.6-s0"], log + job_logs(sweep)
    assert all(report["smoke"] for report in reports.values())
    assert "srun" in job_logs(sweep) or list((sweep / ".submitit").glob("*/*_submission.sh"))

    result = subprocess.run([str(KPRUNE), "summarize", "sweeps/demo"], cwd=work, env=sweep_env(idle),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((sweep / "summary.json").read_text())
    assert sorted(row["rate"] for row in summary["rows"]) == [0.4, 0.6] and not summary["failed"]


def test_a_failed_job_is_reported_and_the_others_finish(idle, tmp_path):
    model, data = write_tiny_checkpoint(tmp_path / "model"), write_mrpc_data(tmp_path / "data")
    work = tmp_path / "work"
    code, log = finish(submit(idle, work, "task=mrpc", f"model.path={tmp_path / 'no-such-model'},{model}",
                              f"data_dir={data}", "pruner=magnitude", "calibration.num_tokens=300",
                              "output_dir=sweep"), work, idle)
    sweep = work / "sweep"
    assert code == 1, log + job_logs(sweep)  # a sweep with a failed job exits 1, after all its jobs ran
    failed, finished = sorted(path for path in sweep.iterdir() if path.is_dir() and not path.name.startswith("."))
    assert (failed / "FAILED.json").exists() and not (failed / "report.json").exists()
    assert "no-such-model" in json.loads((failed / "FAILED.json").read_text())["error"]
    assert (finished / "report.json").exists(), job_logs(sweep)
    assert "failed:" in log and failed.name in log


def test_a_job_requeued_while_pruning_resumes_to_the_uninterrupted_result(idle, tmp_path):
    """``scontrol requeue`` in the middle of K-prune: SLURM kills the job (submitit ignores its
    SIGTERM, SIGKILL follows) and queues it again; it comes back with resume=true
    (SLURM_RESTART_COUNT), continues after its last finished sub-layer and ends bit for bit as an
    uninterrupted run. Meanwhile the sweep waits for it: pending, the job is not finished."""
    model, data = write_tiny_checkpoint(tmp_path / "model"), write_mrpc_data(tmp_path / "data")
    work = tmp_path / "work"
    args = ["task=mrpc", f"model.path={model}", f"data_dir={data}", "pruner=kprune", "rate=0.5",
            "calibration.num_tokens=300", "calibration.batch_size=8"]
    process = submit(idle, work, *args, "output_dir=sweep", KPRUNE_TEST_STEP_PAUSE="3")
    output, sweep = work / "sweep" / "0-mrpc-kprune-r0.5-s0", work / "sweep"
    state = output / STEPS_NAME / STATE_NAME

    deadline = time.monotonic() + 300
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state.exists(), (work / "sweep.log").read_text() + job_logs(sweep)
    done = json.loads(state.read_text())["state"]["done"]
    (job,) = [job for job, status in idle.job_states().items() if status == "RUNNING"]
    idle.command("scontrol", "requeue", job)

    # Killed and queued again (SLURM holds a requeued job back for a while: release it at once).
    deadline = time.monotonic() + 60
    while idle.job_states().get(job) != "PENDING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert idle.job_states().get(job) == "PENDING"
    kept = json.loads(state.read_text())["state"]["done"]
    assert done <= kept < 4 and not (output / "report.json").exists()
    time.sleep(3)
    assert process.poll() is None, "the sweep ended while its job was requeued and pending"
    idle.command("scontrol", "update", f"JobId={job}", "StartTime=now")

    code, log = finish(process, work, idle)
    assert code == 0, log + job_logs(sweep)
    report = json.loads((output / "report.json").read_text())
    assert report["config"]["resume"] is True
    resumed_at = [int(note.split()[3]) for note in report["notes"] if note.startswith("resumed at sub-layer")]
    assert resumed_at == [kept], report["notes"]
    assert "DUE TO JOB REQUEUE" in job_logs(sweep)
    reference = _reference(["run", *args, "device=cpu"], tmp_path / "reference")
    _assert_same_result(output, reference, resumed_at=resumed_at)
