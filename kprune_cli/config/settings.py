"""The checked values of a ``kprune run`` config (configs/run.yaml).

Light on purpose (no torch, transformers or datasets at import): the command checks them before
the heavy imports, so that a bad value is reported in about a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from kprune_cli.config.values import (
    SEED_LIMIT,
    check_bool,
    check_float,
    check_int,
    check_optional_int,
    check_precision,
    check_rate,
    required_keys,
    resolve_config,
)
from kprune_cli.runtime.device import resolve_device
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.output_dir import OutputDir
from kprune_cli.tasks.spec import TaskSpec, get_task

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SampleSize:
    """How much calibration data to draw: ``count`` examples (``unit="examples"``) or ``count`` tokens
    (``unit="tokens"``); the config key is ``calibration.num_<unit>``."""

    count: int
    unit: str

    def __str__(self) -> str:
        return f"calibration.num_{self.unit}={self.count}"


SAMPLE_SIZE_KEYS = ("calibration.num_tokens", "calibration.num_examples")


def prefer_given_sample_size(calibration: DictConfig, given_keys: set[str]) -> None:
    """Where the pruner's config set one sample size and the command line the other, keep the command
    line's: ``pruner=kwon`` draws 2,048 examples, ``pruner=kwon calibration.num_tokens=8000`` 8,000 tokens.
    ``given_keys``: the keys the command line overrode."""
    given = [key for key in SAMPLE_SIZE_KEYS if key in given_keys]
    if len(given) == 1 and OmegaConf.select(calibration, given[0].rpartition(".")[2]) is not None:
        other = next(key for key in SAMPLE_SIZE_KEYS if key not in given).rpartition(".")[2]
        with open_dict(calibration):
            calibration[other] = None


def command_line_keys() -> set[str]:
    """The config keys this job's command line overrode (``calibration.num_tokens=8000`` gives
    ``calibration.num_tokens``); empty outside a Hydra job."""
    if not HydraConfig.initialized():
        return set()
    overrides = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)  # strings, as typed
    return {override.lstrip("+~").partition("=")[0] for override in overrides}


def read_sample_size(calibration: DictConfig) -> SampleSize:
    """The one of ``calibration.num_tokens`` / ``calibration.num_examples`` that is set (the other null)."""
    tokens = check_optional_int("calibration.num_tokens", calibration.num_tokens, 1)
    examples = check_optional_int("calibration.num_examples", calibration.get("num_examples"), 1)
    if (tokens is None) == (examples is None):
        given = "both are set" if tokens is not None else "neither is set"
        raise UserError(f"calibration.num_tokens={tokens} and calibration.num_examples={examples}: {given}; give one "
                        f"and set the other to null (e.g. calibration.num_tokens=100000 calibration.num_examples=null)")
    return SampleSize(examples, "examples") if examples is not None else SampleSize(tokens, "tokens")


CONSTRAINTS = ("flops", "latency")
"""Values of ``constraint``: what ``rate`` is a fraction of."""

LATENCY_RUNTIMES = ("onnxruntime", "torch")
LATENCY_BASELINES = ("runtime", "float32")
"""Values of ``latency.baseline``: what ``rate`` is a fraction of (the dense model on the timed runtime, or in
float32 beside a quantized runtime)."""
LATENCY_QUANTIZATIONS = ("int8",)
"""Values of ``latency.quantize`` besides null: :data:`kprune_cli.deploy.quantization.QUANTIZATIONS` (not
imported here: the deploy packages are optional)."""


@dataclass(frozen=True)
class LatencyOptions:
    """The ``latency`` keys of ``constraint=latency`` (configs/run.yaml), checked; ``None`` values are
    filled in by the pipeline (the run's device, torch's threads, the task's average length)."""

    runtime: str
    quantize: str | None
    baseline: str
    device: str | None
    threads: int | None
    batch_size: int
    seq_len: int | None
    repeats: int
    ffn_step: int | None
    configurations: int
    max_error: float
    verify_repeats: int
    verify_seconds: float
    replan: bool


def read_latency_options(latency: DictConfig) -> LatencyOptions:
    """The ``latency`` keys, or a :class:`UserError` naming the first bad one."""
    if latency.runtime not in LATENCY_RUNTIMES:
        raise UserError(f"latency.runtime={latency.runtime}: choose {' or '.join(LATENCY_RUNTIMES)}")
    quantize = latency.quantize
    if quantize is not None and quantize not in LATENCY_QUANTIZATIONS:
        raise UserError(f"latency.quantize={quantize!r} is not allowed: choose null or "
                        f"{' or '.join(LATENCY_QUANTIZATIONS)}")
    if quantize is not None and latency.runtime != "onnxruntime":
        raise UserError(f"latency.quantize={quantize} times ONNX Runtime's quantized models: give "
                        f"latency.runtime=onnxruntime (not {latency.runtime})")
    baseline = latency.baseline
    if baseline not in LATENCY_BASELINES:
        raise UserError(f"latency.baseline={baseline}: choose {' or '.join(LATENCY_BASELINES)}")
    if baseline == "float32" and quantize is None:
        raise UserError("latency.baseline=float32 compares with the dense float32 model beside a quantized one: it "
                        "needs latency.quantize=int8 (without it, the runtime's dense model is float32 already)")
    return LatencyOptions(
        runtime=str(latency.runtime),
        quantize=None if quantize is None else str(quantize),
        baseline=str(baseline),
        device=None if latency.device is None else str(latency.device),
        threads=check_optional_int("latency.threads", latency.threads, 1),
        batch_size=check_int("latency.batch_size", latency.batch_size, 1),
        seq_len=check_optional_int("latency.seq_len", latency.seq_len, 1),
        repeats=check_int("latency.repeats", latency.repeats, 3),
        ffn_step=check_optional_int("latency.ffn_step", latency.ffn_step, 1),
        configurations=check_int("latency.configurations", latency.configurations, 2),
        max_error=check_float("latency.max_error", latency.max_error, 0.0, above_minimum=True),
        verify_repeats=check_int("latency.verify_repeats", latency.verify_repeats, 3),
        verify_seconds=check_float("latency.verify_seconds", latency.verify_seconds, 0.0),
        replan=check_bool("latency.replan", latency.replan),
    )


@dataclass(frozen=True)
class RunSettings:
    """The plain, checked values of a ``kprune run`` config (configs/run.yaml)."""

    task: TaskSpec
    rate: float
    seed: int
    device: torch.device
    model_path: str
    default_model: str | None
    data_dir: str | None
    eval_batch_size: int
    eval_max_examples: int | None
    eval_dtype: str
    """``fp32``, ``bf16`` or ``fp16``: the precision of the evaluation's forward passes (autocast)."""
    sample_size: SampleSize
    calibration_batch_size: int
    calibration_seed: int
    calibration_source: str | None
    overwrite: bool
    resume: bool
    check_reload: bool
    smoke: bool
    deterministic: bool
    latency: LatencyOptions | None = None
    """The ``latency`` keys with ``constraint=latency``; ``None`` with ``constraint=flops`` (the paper)."""


def read_settings(cfg: DictConfig) -> RunSettings:
    """The values of ``cfg`` the pipeline uses; a :class:`UserError` names the first bad one.

    First settles the sample size in ``cfg`` itself (:func:`prefer_given_sample_size`), so that the
    report's config shows the size that was drawn."""
    resolve_config(cfg)
    given_keys = command_line_keys()
    with required_keys():
        prefer_given_sample_size(cfg.calibration, given_keys)
        return RunSettings(
            task=get_task(str(cfg.task.name)),
            rate=check_rate(cfg.rate),
            seed=check_int("seed", cfg.seed, 0, SEED_LIMIT),
            model_path=str(cfg.model.path),
            default_model=default_model(cfg, given_keys),
            data_dir=None if cfg.data_dir is None else str(cfg.data_dir),
            eval_batch_size=check_int("eval_batch_size", cfg.eval_batch_size, 1),
            eval_max_examples=check_optional_int("eval_max_examples", cfg.eval_max_examples, 1),
            eval_dtype=check_precision("eval_dtype", cfg.eval_dtype),
            sample_size=read_sample_size(cfg.calibration),
            calibration_batch_size=check_int("calibration.batch_size", cfg.calibration.batch_size, 1),
            calibration_seed=check_int("calibration.seed", cfg.calibration.seed, 0, SEED_LIMIT),
            calibration_source=check_source(cfg.calibration.source),
            overwrite=check_bool("overwrite", cfg.overwrite),
            resume=check_bool("resume", cfg.resume),
            check_reload=check_bool("check_reload", cfg.check_reload),
            smoke=check_bool("smoke", cfg.smoke),
            deterministic=check_bool("deterministic", cfg.deterministic),
            latency=read_constraint(cfg),
            device=resolve_device(str(cfg.device)),  # last: it imports torch
        )


def read_constraint(cfg: DictConfig) -> LatencyOptions | None:
    """``constraint``: ``flops`` (``None``) or ``latency`` (its :class:`LatencyOptions`)."""
    constraint = cfg.get("constraint", "flops")
    if constraint not in CONSTRAINTS:
        raise UserError(f"constraint={constraint}: choose {' or '.join(CONSTRAINTS)}")
    return read_latency_options(cfg.latency) if constraint == "latency" else None


def default_model(cfg: DictConfig, given_keys: set[str]) -> str | None:
    """The task's default model (configs/task/), where the command line named no model; else None."""
    if given_keys & {"model", "model.path"}:
        return None
    value = cfg.task.get("default_model")
    return None if value is None else str(value)


def check_source(value: object) -> str | None:
    """``calibration.source``: None (the task's train split) or the path of an existing file."""
    if value is None:
        return None
    if not isinstance(value, str) or not Path(value).expanduser().is_file():
        raise UserError(f"calibration.source={value!r} is not a file: give an unlabeled text or .jsonl file, "
                        f"or null for the task's train split")
    return str(Path(value).expanduser())


def check_run_config(cfg: DictConfig) -> None:
    """:func:`read_settings` for its errors alone, before the pipeline is imported; on a bad value
    the empty job directory Hydra made is removed, as the pipeline does."""
    try:
        read_settings(cfg)
    except UserError:
        OutputDir(Path(str(cfg.output_dir)), overwrite=False).discard_if_empty()
        raise
