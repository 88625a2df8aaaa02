"""hydra-submitit-launcher's launchers, requeuing a preempted job with ``resume=true``
(kprune_cli/sweeps/launchers.py). Defined only where the ``cluster`` extra is installed: Hydra
imports every module of its plugin namespace at start, and one failing to import is a warning."""

from __future__ import annotations

from importlib.util import find_spec

if find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
    from kprune_cli.sweeps.launchers import Resuming

    class ResumingSlurmLauncher(Resuming, SlurmLauncher):
        """The SLURM launcher (one array job), requeuing preempted jobs with ``resume=true``."""

    class ResumingLocalLauncher(Resuming, LocalLauncher):
        """The local launcher (parallel processes), the same way."""
