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
:func:`register_launchers` hands them to Hydra's plugin registry before any command runs: Hydra's
own scan misses them in a setuptools editable install (see there).
"""

from __future__ import annotations

import os
from importlib.util import find_spec
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


def register_launchers() -> None:
    """Register kprune's launchers with Hydra, however kprune was installed.

    Hydra finds plugins by listing the ``hydra_plugins`` namespace package's ``__path__`` with
    ``pkgutil.walk_packages`` (hydra/core/plugins.py). A setuptools editable install
    (``pip install -e .``) imports ``hydra_plugins.kprune_launchers`` through an import hook (the
    ``__editable___*_finder.py`` meta-path finder in site-packages) and leaves only a placeholder
    entry for it in that ``__path__``, which pkgutil cannot list: the scan misses the launchers
    unless the repository root happens to be on ``sys.path`` (``python -m kprune_cli`` from there),
    and ``hydra/launcher=slurm|local`` ends with "Unknown plugin class". Registering the classes
    ourselves works for every kind of install; where the scan found them, nothing changes.
    Without the ``cluster`` extra there is nothing to register.
    """
    if find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        return
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()  # Hydra's scan, first (it may import our module itself)
    from hydra_plugins.kprune_launchers import resuming

    for launcher in (resuming.ResumingSlurmLauncher, resuming.ResumingLocalLauncher):
        if f"{launcher.__module__}.{launcher.__name__}" not in plugins.class_name_to_class:
            plugins.register(launcher)
