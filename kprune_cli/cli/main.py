"""The ``kprune`` command: ``kprune <command> [key=value ...]``, each command a Hydra app.

User mistakes (bad values, missing files, unknown config options) end with one line on
stderr and exit code 2; anything else is a bug and keeps its traceback. Ctrl-C and SIGTERM
stop a job the same way (it cleans up and marks its directory failed), with exit code 130
and 143.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting slow torch down badly on a busy machine (a sweep's
# jobs, a shared node); set before torch is imported anywhere.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys
from pathlib import Path
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.markup import escape

from kprune_cli.config.keys import check_known_keys
from kprune_cli.config.paths import CONFIG_DIR
from kprune_cli.runtime.console import console
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.interrupts import catchable_interrupts
from kprune_cli.runtime.output_dir import write_failure
from kprune_cli.sweeps.launchers import register_launchers
from kprune_cli.sweeps.status import SweepFailed

USAGE = """\
usage: kprune <command> [key=value ...] [-m] [--help] [--cfg job]

Retraining-free pruning of fine-tuned encoders (K-prune, ICLR 2024).

commands:
  run        prune a fine-tuned model; writes pruned/, report.json, report.md
             (no arguments: the offline demo, MiniLM on a generated task)
  finetune   fine-tune an encoder on a task into a dense baseline
  eval       task metric of any checkpoint on the task's dev split
  bench      measured latency of a checkpoint, vs its dense model with dense=<path>
  latency-table  a model's measured latency by sub-layer width on a runtime (what constraint=latency prunes with)
  export     a checkpoint as an ONNX model (format=onnx; pip install -e .[deploy])
  compare    pruners side by side: a sweep of run over pruner x rate, then summarize
  summarize  one table (CSV, Markdown, JSON) and plots over the runs under directories

common keys (Hydra overrides; `kprune <command> --help` lists all):
  task=cola|sst2|mrpc|stsb|qqp|mnli|qnli|rte|squad|squad_v2|demo
  model.path=<dir or hub id>   rate=0.5   pruner=kprune|magnitude|...
  calibration.num_tokens=100000 | calibration.num_examples=2048   data_dir=<local data>   device=auto|cpu|cuda
  output_dir=<dir> (with -m: the sweep's directory)   overwrite=true   seed=0
  resume=true   continue a killed run in output_dir after its last finished sub-layer (K-prune)
  hydra/launcher=local|slurm   run a sweep's jobs in parallel processes or on SLURM (pip install -e .[cluster])

examples:
  kprune run
  kprune run task=mrpc rate=0.6 model.path=path/to/finetuned-mrpc data_dir=path/to/glue/mrpc
  kprune run -m task=mrpc rate=0.4,0.6,0.8 pruner=kprune,magnitude seed=0,1,2 model.path=...
  kprune compare task=mrpc pruners=kprune,kwon,magnitude rate=0.4,0.6,0.8 model.path=... data_dir=...
  kprune summarize multirun/2024-05-01_12-00-00 --layers multirun/2024-05-01_12-00-00/0-mrpc-kprune-r0.4-s0
  kprune finetune task=mrpc model=minilm data_dir=path/to/glue/mrpc output_dir=out/minilm-mrpc
  kprune eval checkpoint=out/mrpc60/pruned task=mrpc data_dir=path/to/glue/mrpc
  kprune bench checkpoint=out/mrpc60/pruned dense=path/to/finetuned-mrpc task=mrpc
  kprune export checkpoint=out/mrpc60/pruned task=mrpc format=onnx output_dir=out/mrpc60-onnx
  kprune run task=mrpc constraint=latency rate=0.6 latency.runtime=onnxruntime latency.batch_size=32 model.path=...
"""


def _bench(cfg: DictConfig) -> None:
    from kprune_cli.cli.bench import run_bench

    run_bench(cfg)


def _latency_table(cfg: DictConfig) -> None:
    from kprune_cli.cli.latency_table import run_latency_table

    run_latency_table(cfg)


def _check_run(cfg: DictConfig) -> None:
    from kprune_cli.config.settings import check_run_config

    check_run_config(cfg)


def _export(cfg: DictConfig) -> None:
    from kprune_cli.cli.export import run_export

    run_export(cfg)


def _run(cfg: DictConfig) -> None:
    from kprune_cli.cli.run import run_pruning

    run_pruning(cfg)


def _finetune(cfg: DictConfig) -> None:
    from kprune_cli.cli.finetune import run_finetune

    run_finetune(cfg)


def _eval(cfg: DictConfig) -> None:
    from kprune_cli.cli.evaluate import run_eval

    run_eval(cfg)


def _summarize(args: list[str]) -> None:
    from kprune_cli.cli.summarize import summarize_command

    summarize_command(args)


def _compare(args: list[str]) -> None:
    from kprune_cli.cli.compare import compare_command

    compare_command(args, launch=lambda overrides: run_hydra_command("run", overrides))


COMMANDS: dict[str, Callable[[DictConfig], None]] = {"run": _run, "finetune": _finetune, "eval": _eval,
                                                     "bench": _bench, "export": _export,
                                                     "latency-table": _latency_table}
# Checks of a command's config values that import nothing heavy: they run before torch, transformers
# and datasets load, so that a bad value is reported in about a second.
EARLY_CHECKS: dict[str, Callable[[DictConfig], None]] = {"run": _check_run}
# Commands that are not Hydra apps: they take their arguments as they are.
PLAIN_COMMANDS: dict[str, Callable[[list[str]], None]] = {"compare": _compare, "summarize": _summarize}
# Commands whose output_dir is the Hydra job directory (see _route_output_dir).
JOB_DIR_COMMANDS = ("run",)


class _JobState:
    """Whether Hydra got as far as calling the job (else a failure was in composing the config)."""

    started = False


class _Job:
    """The Hydra task function of a command.

    A single run ends on a user mistake (exit 2). A job of a sweep (``-m``) that fails records
    why in its directory (FAILED.json) and returns, so the other jobs still run; the sweep
    exits 1 at the end (kprune_cli/sweeps/status.py). A class rather than a closure: launchers
    that run jobs in other processes (submitit) pickle it, by reference.
    """

    def __init__(self, command: Callable[[DictConfig], None],
                 check: Callable[[DictConfig], None] | None = None) -> None:
        self.command = command
        self.check = check

    def __call__(self, cfg: DictConfig) -> None:
        _JobState.started = True
        try:
            with catchable_interrupts():
                if self.check is not None:
                    self.check(cfg)
                _quiet_third_party_progress()
                self.command(cfg)
        except UserError as error:
            _print_error(error)
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                sys.exit(UserError.exit_code)
            _record_failure(error, cfg)
        except KeyboardInterrupt as interrupt:
            console.print(f"[bold red]interrupted[/] {escape(str(interrupt))}".rstrip(), highlight=False)
            sys.exit(getattr(interrupt, "exit_code", 130))
        except Exception as error:
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                raise
            console.print_exception()
            _record_failure(error, cfg)


def _record_failure(error: Exception, cfg: DictConfig) -> None:
    """Leave FAILED.json in the sweep job's directory (the pipeline writes none for a user mistake,
    and has written the same one for any other error)."""
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    write_failure(job_dir, error, OmegaConf.to_container(cfg, resolve=False))
    console.print(f"[bold red]job failed:[/] {escape(str(job_dir))}", highlight=False, soft_wrap=True)


def _quiet_third_party_progress() -> None:
    """Our rich progress bars stand for the long loops; the libraries' own tqdm bars would interleave.
    The hub client's retry warnings are quieted too: offline, each request logged one before our
    own one-line error said the hub is unreachable."""
    import datasets
    import huggingface_hub
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()


MULTIRUN_FLAGS = ("-m", "--multirun")


def _multirun_first(overrides: list[str]) -> list[str]:
    """``-m`` moved before the overrides: Hydra's parser takes flags only ahead of them
    (``kprune run rate=0.4,0.6 -m seed=0,1`` would be refused)."""
    flags = [arg for arg in overrides if arg in MULTIRUN_FLAGS]
    return flags[:1] + [arg for arg in overrides if arg not in MULTIRUN_FLAGS]


def _route_output_dir(overrides: list[str]) -> list[str]:
    """``output_dir=DIR`` names the directory Hydra makes for the job: ``hydra.run.dir=DIR`` for
    one run, ``hydra.sweep.dir=DIR`` under ``-m`` (each job in a sub-directory of DIR)."""
    key = "hydra.sweep.dir" if set(MULTIRUN_FLAGS) & set(overrides) else "hydra.run.dir"
    prefix = "output_dir="
    for arg in overrides:
        if arg.startswith(prefix):
            _check_output_dir(arg[len(prefix):])
    return [key + "=" + arg[len(prefix):] if arg.startswith(prefix) else arg for arg in overrides]


def _check_group_choices(overrides: list[str]) -> None:
    """A :class:`UserError` for a config group set to something other than an option name
    (``task=null``, ``task=true``), which Hydra answers with a traceback rather than a message."""
    parser = OverridesParser.create()
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue  # flags: -m, --cfg job
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue  # Hydra reports a malformed override itself
        folder = CONFIG_DIR / override.key_or_group
        if override.is_sweep_override() or not folder.is_dir():
            continue
        value = override.value()
        if not isinstance(value, str) and not (override.is_delete() and value is None):
            options = sorted(path.stem for path in folder.glob("*.yaml"))
            raise UserError(f"{override.input_line} is not allowed: choose one of {', '.join(options)}")


def _check_output_dir(value: str) -> None:
    """A :class:`UserError` for an ``output_dir`` that cannot become a directory: empty or unset,
    an existing file, or below a file or an unwritable directory. Hydra creates it, before any job
    could say what is wrong; values with ``${...}`` are left to Hydra."""
    if value.strip().strip("'\"") in ("", "???", "null"):
        raise UserError(f"output_dir={value!r} is not a directory path: give one, e.g. output_dir=outputs/my-run")
    if "${" in value:
        return
    path = Path(value).expanduser().absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise UserError(f"output_dir={value!r} cannot be a directory: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output_dir={value!r} cannot be created: {existing} is not writable")


def _print_error(error: Exception | str) -> None:
    """The one line a user mistake ends with."""
    console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)


def _plain(command: Callable[[list[str]], None], args: list[str]) -> None:
    try:
        command(args)
    except UserError as error:
        _print_error(error)
        sys.exit(UserError.exit_code)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        sys.exit(130)


def main() -> None:
    """Entry point of the ``kprune`` console script."""
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if args else 2)
    command, overrides = args[0], args[1:]
    if command in PLAIN_COMMANDS:
        _plain(PLAIN_COMMANDS[command], overrides)
    elif command in COMMANDS:
        run_hydra_command(command, overrides)
    else:
        print(f"error: unknown command {command!r}: choose one of {', '.join([*COMMANDS, *PLAIN_COMMANDS])}",
              file=sys.stderr)
        sys.exit(2)


def run_hydra_command(command: str, overrides: list[str]) -> None:
    """Run the Hydra app of ``command`` (a key of :data:`COMMANDS`) with command-line ``overrides``."""
    overrides = _multirun_first(overrides)
    try:
        _check_group_choices(overrides)
        check_known_keys(CONFIG_DIR, command, overrides)
        if command in JOB_DIR_COMMANDS:
            overrides = _route_output_dir(overrides)
    except UserError as error:
        _print_error(error)
        sys.exit(UserError.exit_code)
    register_launchers()  # before Hydra looks for hydra/launcher=slurm|local
    _JobState.started = False
    sys.argv = [f"kprune {command}", *overrides]
    app = hydra.main(config_path=str(CONFIG_DIR), config_name=command, version_base="1.3")(
        _Job(COMMANDS[command], EARLY_CHECKS.get(command)))
    try:
        app()
    except SystemExit as exit_:
        # Hydra reports a bad override or an unknown config option itself (one message, exit 1)
        # before any job starts: that is a user mistake too.
        if exit_.code == 1 and not _JobState.started and not isinstance(exit_, SweepFailed):
            sys.exit(UserError.exit_code)
        raise
    except OmegaConfBaseException as error:
        # A Hydra setting that does not resolve (e.g. output_dir=${nope}) escapes Hydra's own report.
        if _JobState.started:
            raise
        _print_error(f"a Hydra setting does not resolve: {(str(error) or type(error).__name__).splitlines()[0]}")
        sys.exit(UserError.exit_code)


if __name__ == "__main__":
    main()
