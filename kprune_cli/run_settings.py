"""The checked values of a ``kprune run`` config (configs/run.yaml).

Light on purpose (no torch, transformers or datasets at import): the command checks them before
the heavy imports, so that a bad value is reported in about a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from kprune_cli.config_values import (
    SEED_LIMIT,
    check_bool,
    check_int,
    check_optional_int,
    check_rate,
    required_keys,
    resolve_config,
)
from kprune_cli.devices import resolve_device
from kprune_cli.errors import UserError
from kprune_cli.outputs import OutputDir
from kprune_cli.tasks.spec import TaskSpec, get_task

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RunSettings:
    """The plain, checked values of a ``kprune run`` config (configs/run.yaml)."""

    task: TaskSpec
    rate: float
    seed: int
    device: torch.device
    model_path: str
    data_dir: str | None
    eval_batch_size: int
    eval_max_examples: int | None
    num_tokens: int
    calibration_batch_size: int
    calibration_seed: int
    overwrite: bool
    check_reload: bool
    smoke: bool


def read_settings(cfg: DictConfig) -> RunSettings:
    """The values of ``cfg`` the pipeline uses; a :class:`UserError` names the first bad one."""
    resolve_config(cfg)
    with required_keys():
        return RunSettings(
            task=get_task(str(cfg.task.name)),
            rate=check_rate(cfg.rate),
            seed=check_int("seed", cfg.seed, 0, SEED_LIMIT),
            model_path=str(cfg.model.path),
            data_dir=None if cfg.data_dir is None else str(cfg.data_dir),
            eval_batch_size=check_int("eval_batch_size", cfg.eval_batch_size, 1),
            eval_max_examples=check_optional_int("eval_max_examples", cfg.eval_max_examples, 1),
            num_tokens=check_int("calibration.num_tokens", cfg.calibration.num_tokens, 1),
            calibration_batch_size=check_int("calibration.batch_size", cfg.calibration.batch_size, 1),
            calibration_seed=check_int("calibration.seed", cfg.calibration.seed, 0, SEED_LIMIT),
            overwrite=check_bool("overwrite", cfg.overwrite),
            check_reload=check_bool("check_reload", cfg.check_reload),
            smoke=check_bool("smoke", cfg.smoke),
            device=resolve_device(str(cfg.device)),  # last: it imports torch
        )


def check_run_config(cfg: DictConfig) -> None:
    """:func:`read_settings` for its errors alone, before the pipeline is imported; on a bad value
    the empty job directory Hydra made is removed, as the pipeline does."""
    try:
        read_settings(cfg)
    except UserError:
        OutputDir(Path(str(cfg.output_dir)), overwrite=False).discard_if_empty()
        raise
