"""A test hook for tests/test_slurm.py, imported at start by any Python whose PYTHONPATH holds this
folder: inside a SLURM job (``SLURM_JOB_ID`` set) with ``KPRUNE_TEST_STEP_PAUSE=<seconds>``, K-prune
pauses that long after saving each sub-layer's step checkpoint, so that the test can requeue the
job in the middle of pruning. Anywhere else it does nothing."""

import os

if os.environ.get("SLURM_JOB_ID") and os.environ.get("KPRUNE_TEST_STEP_PAUSE"):
    import time

    from kprune_cli.runtime import steps as resume

    _save = resume.StepCheckpoints.save

    def _save_then_pause(self, *args, **kwargs):
        _save(self, *args, **kwargs)
        time.sleep(float(os.environ["KPRUNE_TEST_STEP_PAUSE"]))

    resume.StepCheckpoints.save = _save_then_pause
