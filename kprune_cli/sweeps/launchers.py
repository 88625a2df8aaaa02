"""Sweep launchers whose preempted jobs come back resuming (``hydra/launcher=slurm|local``).

hydra-submitit-launcher's launchers are submitit's checkpointable callables: when SLURM preempts
a job (or its time runs out), submitit receives its signal (USR2), calls :meth:`checkpoint`,
requeues the job with what that returns and exits it. The launchers here requeue it with
``resume=true`` added to the job's overrides, so that the job continues after its last finished
sub-layer (kprune_cli/runtime/steps.py) instead of being refused its own non-empty directory. A job that
SLURM requeued by itself (after SIGKILL, without submitit's signal: ``SLURM_RESTART_COUNT`` > 0)
resumes too. Meanwhile the job's SIGTERM is left to submitit, which ignores it
(kprune_cli/runtime/interrupts.py).

The launcher classes themselves live in ``hydra_plugins/kprune_launchers/resuming.py`` (Hydra
takes launchers only from its ``hydra_plugins`` namespace), defined when the ``cluster`` extra is
installed (``pip install -e .[cluster]``); the configs in configs/hydra/launcher/ name them.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

RESUME = "resume=true"


def resuming(overrides: Sequence[str]) -> list[str]:
    """``overrides`` with ``resume=true`` in place of any ``resume=...`` it had."""
    return [override for override in overrides if not override.lstrip("+~").startswith("resume=")] + [RESUME]


def requeued_by_slurm() -> bool:
    """Whether SLURM itself has requeued this job (``SLURM_RESTART_COUNT`` > 0)."""
    return os.environ.get("SLURM_RESTART_COUNT", "0").strip() not in ("", "0")


class Resuming:
    """Mixin for a hydra-submitit launcher (``__call__(sweep_overrides, ...)``, ``checkpoint(...)``)."""

    def __call__(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        if requeued_by_slurm():
            sweep_overrides = resuming(sweep_overrides)
        return super().__call__(sweep_overrides, *args, **kwargs)  # type: ignore[misc]

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        """The job to requeue after a preemption or timeout: this one, with ``resume=true``."""
        return super().checkpoint(resuming(sweep_overrides), *args, **kwargs)  # type: ignore[misc]
