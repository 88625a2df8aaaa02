"""The end of a sweep: list the jobs that failed and make the command exit non-zero.

Under ``-m`` the CLI's job wrapper records a failed job in its directory (``FAILED.json``) and
returns, so the other jobs still run. Jobs may run in other processes or on other machines
(submitit), so the outcome is read back from the job directories once all have ended.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.markup import escape

from kprune_cli.runtime.console import console


class SweepFailed(SystemExit):
    """Some jobs of a sweep failed (each recorded in its directory): exit status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SweepStatus(Callback):
    """Hydra callback (``hydra.callbacks`` in configs/run.yaml)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from kprune_cli.sweeps.collect import find_runs  # reads reports: imports torch, so not at `kprune --help`

        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = find_runs([sweep_dir]).failed if sweep_dir.is_dir() else []
        if not failed:
            console.print(f"sweep finished: {sweep_dir}", highlight=False, soft_wrap=True)
            return
        for run in failed:
            console.print(f"[bold red]failed:[/] {escape(f'{run.path}: {run.error}')}", highlight=False, soft_wrap=True)
        failure = SweepFailed(f"{len(failed)} job(s) of the sweep in {sweep_dir} failed (see FAILED.json in each)")
        console.print(f"[bold red]error:[/] {failure}", highlight=False, soft_wrap=True)
        raise failure
