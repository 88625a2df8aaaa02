"""The ``kprune`` command: ``kprune <command> [key=value ...]``, each command a Hydra app.

User mistakes (bad values, missing files, unknown config options) end with one line on
stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import hydra
from omegaconf import DictConfig

from kprune_cli.console import console
from kprune_cli.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

USAGE = """\
usage: kprune <command> [key=value ...] [-m] [--help] [--cfg job]

Retraining-free pruning of fine-tuned encoders (K-prune, ICLR 2024).

commands:
  run        prune a fine-tuned model; writes pruned/, report.json, report.md
             (no arguments: the offline demo, MiniLM on a generated task)
  finetune   fine-tune an encoder on a task into a dense baseline
  eval       task metric of any checkpoint on the task's dev split

common keys (Hydra overrides; `kprune <command> --help` lists all):
  task=cola|sst2|mrpc|stsb|qqp|mnli|qnli|rte|squad|squad_v2|demo
  model.path=<dir or hub id>   rate=0.5   pruner=kprune|magnitude|...
  calibration.num_tokens=100000   data_dir=<local data>   device=auto|cpu|cuda
  output_dir=<dir>   overwrite=true   seed=0

examples:
  kprune run
  kprune run task=mrpc rate=0.6 model.path=path/to/finetuned-mrpc data_dir=path/to/glue/mrpc
  kprune run -m task=mrpc rate=0.4,0.6,0.8 model.path=...
  kprune finetune task=mrpc model=minilm data_dir=path/to/glue/mrpc output_dir=out/minilm-mrpc
  kprune eval checkpoint=out/mrpc60/pruned task=mrpc data_dir=path/to/glue/mrpc
"""


def _run(cfg: DictConfig) -> None:
    from kprune_cli.pipeline import run_pruning

    run_pruning(cfg)


def _finetune(cfg: DictConfig) -> None:
    from kprune_cli.finetune import run_finetune

    run_finetune(cfg)


def _eval(cfg: DictConfig) -> None:
    from kprune_cli.evaluate_checkpoint import run_eval

    run_eval(cfg)


COMMANDS: dict[str, Callable[[DictConfig], None]] = {"run": _run, "finetune": _finetune, "eval": _eval}


class _JobState:
    """Whether Hydra got as far as calling the job (else a failure was in composing the config)."""

    started = False


def _job(command: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    def job(cfg: DictConfig) -> None:
        _JobState.started = True
        try:
            command(cfg)
        except UserError as error:
            console.print(f"[bold red]error:[/] {error}", highlight=False)
            sys.exit(UserError.exit_code)
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            sys.exit(130)

    return job


def _quiet_third_party_progress() -> None:
    """Our rich progress bars stand for the long loops; the libraries' own tqdm bars would interleave."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main() -> None:
    """Entry point of the ``kprune`` console script."""
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if args else 2)
    command, overrides = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}: choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)

    _quiet_third_party_progress()
    _JobState.started = False
    sys.argv = [f"kprune {command}", *overrides]
    app = hydra.main(config_path=str(CONFIG_DIR), config_name=command, version_base="1.3")(_job(COMMANDS[command]))
    try:
        app()
    except SystemExit as exit_:
        # Hydra reports a bad override or an unknown config option itself (one message, exit 1)
        # before any job starts: that is a user mistake too.
        if exit_.code == 1 and not _JobState.started:
            sys.exit(UserError.exit_code)
        raise


if __name__ == "__main__":
    main()
