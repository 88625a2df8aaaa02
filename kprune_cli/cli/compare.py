"""``kprune compare``: pruners side by side on one task, one table and one plot.

A comparison is a sweep of ``kprune run`` over pruner × rate (Hydra multirun, so any launcher
works and any other run key may be given or swept, e.g. ``seed=0,1,2``), followed by
``kprune summarize`` of the sweep directory. Each pruner runs at its own official settings: its
calibration sample (K-prune 100K tokens, Kwon et al. 2,048 examples) and its gradient batch, both
from its configs, as a plain ``kprune run pruner=...`` would. Jobs with the same seed draw from the
same seeded order (``calibration.seed`` follows ``seed``); ``calibration.num_tokens=N`` or
``calibration.num_examples=N`` gives every pruner the same sample instead.

    kprune compare task=mrpc model.path=... data_dir=... pruners=kprune,kwon,magnitude rate=0.4,0.6,0.8
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from kprune_cli.cli.summarize import file_slug, print_outcome, write_summary
from kprune_cli.sweeps.collect import find_runs
from kprune_cli.sweeps.status import SweepFailed

DEFAULTS = {"pruner": "kprune,kwon,magnitude", "rate": "0.4,0.6,0.8"}
ALIASES = {"pruners": "pruner", "rates": "rate"}
USAGE = f"""\
usage: kprune compare [key=value ...]

Run every pruner at every rate, each at its own official settings (calibration sample, gradient
batch), as a `kprune run -m` sweep; then write summary.csv/.md/.json and a metric-vs-FLOPs plot
into the sweep's directory.

  pruners=a,b,...   pruners to compare (default {DEFAULTS['pruner']})
  rate=r1,r2,...    FLOPs reduction rates (default {DEFAULTS['rate']})
  output_dir=DIR    the comparison's directory (default outputs/compare-<task>-<time>)
  calibration.num_tokens=N | calibration.num_examples=N   one sample size for every pruner
  any `kprune run` key (task=, model.path=, data_dir=, seed=0,1,2,
  hydra/launcher=local|slurm, ...); `kprune run --help` lists them.
"""


def comparison_overrides(args: Sequence[str], now: datetime) -> tuple[list[str], Path]:
    """The ``kprune run -m`` overrides of a comparison, and the directory its jobs and tables go to.

    ``pruners=``/``rates=`` are accepted for ``pruner=``/``rate=``; both default to :data:`DEFAULTS`.
    ``output_dir=DIR`` names the directory (default ``outputs/compare-<task>-<time>``).
    """
    given: dict[str, str] = {}
    for arg in args:
        if arg in ("-m", "--multirun"):
            continue
        key, _, value = arg.partition("=")
        given[ALIASES.get(key, key)] = value
    for key, value in DEFAULTS.items():
        given.setdefault(key, value)
    if "output_dir" not in given:
        task = f"-{file_slug(given['task'])}" if "task" in given else ""
        given["output_dir"] = f"outputs/compare{task}-{now:%Y%m%d-%H%M%S}"
    return [f"{key}={value}" for key, value in given.items()], Path(given["output_dir"])


def compare_command(args: Sequence[str], launch: Callable[[list[str]], None]) -> None:
    """Run the comparison sweep through ``launch`` (``kprune run`` with the given overrides),
    then write summary.{csv,md,json} and the metric-vs-FLOPs plot into its directory.

    A sweep with failed jobs is still summarized; then its :class:`SweepFailed` is re-raised.
    """
    if {"-h", "--help"} & set(args):
        print(USAGE, end="")
        return
    overrides, directory = comparison_overrides(args, datetime.now())
    failure: SweepFailed | None = None
    try:
        launch(["-m", *overrides])
    except SweepFailed as error:
        failure = error
    runs = find_runs([directory])
    if runs.finished:
        print_outcome(runs, write_summary(runs, directory))
    if failure is not None:
        raise failure
