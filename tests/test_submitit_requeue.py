"""The sweep driver's view of a requeued SLURM job (hydra-submitit-launcher waits on each job's
``job.results()``): a job is finished once its result file exists or ``sacct`` gives it a final
state. Requeued, pending again or preempted, it is not finished, so the sweep keeps waiting for it
(tests/test_slurm.py requeues a real job; its test cluster has no ``sacct`` at all, whose error
submitit bypasses: the state is then UNKNOWN, not finished either)."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                reason="submitit is not installed (pip install -e .[cluster])")

SACCT_HEADER = "JobID|State|NodeList"


def watcher_after(*lines: str):
    from submitit.slurm.slurm import SlurmInfoWatcher

    watcher = SlurmInfoWatcher(delay_s=600)
    watcher.register_job("12_0")
    watcher._info_dict.update(watcher.read_info("\n".join([SACCT_HEADER, *lines])))
    return watcher


@pytest.mark.parametrize("state", ["REQUEUED", "PENDING", "PREEMPTED", "RUNNING"])
def test_a_requeued_job_is_not_finished(state):
    # sacct after `scontrol requeue` (or submitit's own requeue on preemption): the killed batch
    # step is listed too, with a final state of its own, which must not count for the job.
    watcher = watcher_after(f"12_0|{state}|None assigned", "12_0.batch|CANCELLED|vm", "12_1|COMPLETED|vm")
    assert not watcher.is_done("12_0", mode="cache")
    assert watcher.is_done("12_1", mode="cache")


def test_without_sacct_a_job_waits_for_its_result():
    watcher = watcher_after()  # sacct failed (no accounting): nothing known
    assert watcher.get_state("12_0", mode="cache") == "UNKNOWN"
    assert not watcher.is_done("12_0", mode="cache")
