"""``kprune run``: config → load → calibration sample → prune → evaluate → save → report.

Each arrow is one function call with plain inputs; the pruner sees no config or file.
Every config value is checked before anything is written (a bad one is a one-line error).
Outputs are staged: the checkpoint and the reports appear under ``output_dir`` only once
complete, and a run that fails leaves ``FAILED.json`` (error + config) instead; a pruned
model with NaN or infinite weights is never saved. A pass that runs out of GPU memory is
retried with smaller batches, and the report says so.
"""

from __future__ import annotations

import shlex
import tempfile
from contextlib import ExitStack
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.markup import escape

from kprune_cli.config.settings import read_settings
from kprune_cli.config.values import required_keys
from kprune_cli.core.builtins import resolve_data_dir, resolve_model_path, task_default_hint
from kprune_cli.core.evaluation import capped_evaluation_note, evaluate_model
from kprune_cli.core.latency_budget import (
    baseline_note,
    float32_baseline,
    float32_over_quantized,
    latency_cost,
    rate_over_runtime,
    replan_note,
    replan_rate,
    replan_record,
    replan_refused_note,
    runtime_shape,
    table_settings,
    verify_speedup,
)
from kprune_cli.core.report import (
    SMOKE_NOTE,
    Report,
    build_report,
    model_card,
    print_summary,
    run_identity,
    write_reports,
)
from kprune_cli.core.safeguards import non_finite_tensors
from kprune_cli.core.stages import build_pruner, draw_sample, flops_model, prune_and_slice
from kprune_cli.deploy.quantization import int8_model
from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.checkpoint import check_reload, save_pruned
from kprune_cli.models.loading import count_parameters, load_model, stored_dtype
from kprune_cli.models.model_card import write_model_card
from kprune_cli.pruners.base import PruneProblem, Pruner
from kprune_cli.pruners.kprune.pruner import KPrunePruner
from kprune_cli.runtime.console import console, make_progress, warn
from kprune_cli.runtime.errors import UserError, listed
from kprune_cli.runtime.hardware import announce_device, emulated_note
from kprune_cli.runtime.interrupts import deferred_interrupts
from kprune_cli.runtime.memory import peak_memory_mb, reset_peak_memory
from kprune_cli.runtime.output_dir import OutputDir, write_errors
from kprune_cli.runtime.precision import PRECISIONS, deterministic_algorithms
from kprune_cli.runtime.steps import StepCheckpoints
from kprune_cli.runtime.timing import timed
from kprune_cli.tasks.calibration import calibration_rows
from kprune_cli.tasks.data import load_task_data
from kprune_cli.tasks.kinds import kind_of
from kprune_cli.tasks.spec import TaskSpec


def refuse_unlabeled_task(pruner: Pruner, name: str, task: TaskSpec) -> None:
    """A :class:`UserError` when a pruner that reads gold labels is given a task without (sentence embeddings)."""
    if pruner.needs_labels and not kind_of(task).labelled:
        raise UserError(f"pruner={name} needs gold labels (it uses the task loss), and task={task.name} has none "
                        f"(a sentence-embedding task): use pruner=kprune, magnitude or random")


def refuse_unlabeled_source(pruner: Pruner, name: str, source: str | None) -> None:
    """A :class:`UserError` when a pruner that reads gold labels is given an unlabeled source."""
    if source is not None and pruner.needs_labels:
        raise UserError(f"pruner={name} needs labelled calibration data (it uses the task loss), and "
                        f"calibration.source={source} has no labels: use calibration.source=null (the train split) "
                        f"or a pruner that needs none (kprune)")


RESULTS_REMEDY = "free space (or let this job write there) and run again with resume=true"


def run_command(output_dir: Path) -> str | None:
    """The command line that runs this job alone (a sweep's job included): ``kprune run``, its
    overrides as typed and its ``output_dir`` (which kprune hands Hydra as ``hydra.run.dir``);
    ``None`` outside Hydra."""
    if not HydraConfig.initialized():
        return None
    return shlex.join(["kprune", "run", *HydraConfig.get().overrides.task, f"output_dir={output_dir}"])


def run_pruning(cfg: DictConfig) -> Report:
    """Run one pruning job described by ``cfg`` (configs/run.yaml) and return its report."""
    output_path = Path(str(cfg.output_dir))  # always set: Hydra makes it (see configs/run.yaml)
    pruner_name = HydraConfig.get().runtime.choices.get("pruner", "custom") if HydraConfig.initialized() else "custom"
    try:
        settings = read_settings(cfg)
        with required_keys():
            pruner = build_pruner(cfg.pruner, pruner_name)
        refuse_unlabeled_source(pruner, pruner_name, settings.calibration_source)
        refuse_unlabeled_task(pruner, pruner_name, settings.task)
        output = OutputDir(output_path, overwrite=settings.overwrite)
        if settings.resume and not settings.overwrite and (finished := output.finished_report()) is not None:
            console.print(f"[bold]kprune:[/] {escape(str(output_path))} holds a finished run: nothing to resume",
                          highlight=False, soft_wrap=True)
            return finished
        steps = StepCheckpoints(output_path, run_identity(cfg, settings.device))
        if settings.resume:
            steps.check_resumable()
    except UserError:
        OutputDir(output_path, overwrite=False).discard_if_empty()
        raise
    task, device = settings.task, settings.device
    timing: dict[str, float] = {}
    numerics = ExitStack()  # deterministic=true until the job ends
    try:
        # Ctrl-C or SIGTERM while the lock is being taken is raised once it is held, inside this
        # try, so the directory is marked failed (not left locked); a refused claim leaves it as it was.
        with deferred_interrupts(), write_errors(f"output_dir={output_path}",
                                                 "choose an output_dir this job may write to"):
            output.claim(resume=settings.resume)
        numerics.enter_context(deterministic_algorithms(settings.deterministic))  # before CUDA starts
        announce_device(device)
        eval_dtype = PRECISIONS[settings.eval_dtype]
        slow = emulated_note(f"eval_dtype={settings.eval_dtype}", eval_dtype, device, "the evaluation's passes",
                             "eval_dtype=fp32")
        if isinstance(pruner, KPrunePruner):
            slow += pruner.precision_notes(device)
        for note in slow:  # hours instead of minutes deserve a word before they start
            warn(note)
        reset_peak_memory(device)  # this job's peak, not the sweep's so far (one process runs a sweep's jobs)
        torch.manual_seed(settings.seed)
        with timed(timing, "load"):
            model_path, notes = resolve_model_path(settings.model_path, task, device, settings.default_model)
            data = load_task_data(task, resolve_data_dir(task, settings.data_dir),
                                  splits=None if settings.calibration_source is None else task.eval_splits)
            with task_default_hint(model_path, task, settings.default_model):
                model, tokenizer = load_model(model_path, task, device)
            if broken := non_finite_tensors(model):
                raise UserError(f"model {model_path!r} has NaN or infinite values in {listed(broken)}: "
                                f"pass a model with finite weights")
            adapter = get_adapter(model)
        notes += data.notes + capped_evaluation_note(task, data, settings.eval_max_examples)
        if settings.smoke:
            notes.append(SMOKE_NOTE)

        flops = flops_model(task, adapter, tokenizer, data[task.eval_splits[0]])
        dense_structure = adapter.structure()
        dense_params = count_parameters(model)
        latency = shape = float32_ratio = None
        runtime_rate = settings.rate  # of the dense model's time on the timed runtime
        if settings.latency is not None:  # before any pruning work: an unreachable rate ends the run here
            shape = runtime_shape(settings.latency, task, device)
            if settings.latency.baseline == "float32":
                with timed(timing, "latency_baseline"):
                    float32_ratio = float32_over_quantized(model, shape, settings.latency.verify_repeats,
                                                           settings.latency.verify_seconds)
                runtime_rate = rate_over_runtime(settings.rate, float32_ratio, shape)
                notes.append(baseline_note(settings.rate, runtime_rate, float32_ratio, shape))
            with timed(timing, "latency_table"), make_progress() as progress:
                latency = latency_cost(model, shape, table_settings(settings.latency), runtime_rate, progress, notes)

        with timed(timing, "evaluate_dense"):
            dense_metrics = evaluate_model(model, tokenizer, task, data, device, batch_size=settings.eval_batch_size,
                                           notes=notes, max_examples=settings.eval_max_examples, dtype=eval_dtype)
        with timed(timing, "calibration"):
            rows, source_notes = calibration_rows(task, data, settings.calibration_source)
            sample, shortfall = draw_sample(task, rows, tokenizer, settings.sample_size,
                                            settings.calibration_seed, settings.calibration_batch_size)
        notes += source_notes + shortfall
        steps.bind_examples(sample.example_indices)
        planned_rate, replanned, measured = runtime_rate, None, None
        notes_before_pruning = len(notes)
        while True:  # once, or twice when a missed latency target is re-planned
            problem = PruneProblem(model=model, adapter=adapter, task=task, sample=sample, flops=flops,
                                   rate=planned_rate, device=device, seed=settings.seed,
                                   steps=steps if replanned is None else None, latency=latency)
            with timed(timing, "prune"):
                result = prune_and_slice(pruner, problem, notes)
            if latency is None:
                break
            with timed(timing, "verify_latency"):
                dense_model, _ = load_model(model_path, task, "cpu")
                measured = verify_speedup(dense_model, model, shape, settings.latency.verify_repeats, latency.table,
                                          runtime_rate, adapter.structure(),
                                          min_seconds=settings.latency.verify_seconds)
                if float32_ratio is not None:
                    measured["baseline"] = float32_baseline(measured, settings.rate, float32_ratio)
                del dense_model
            if replanned is not None:
                measured["replan"] = replanned
                break
            if measured["met"] or not settings.latency.replan:
                break
            if (planned_rate := replan_rate(measured, latency.table)) is None:
                notes.append(replan_refused_note(measured))
                break
            replanned = replan_record(measured, planned_rate)
            del notes[notes_before_pruning:]  # the first plan's pruning notes: that model is discarded
            notes.append(replan_note(measured, planned_rate))
            with timed(timing, "load"):  # the second plan starts from the dense model again
                model, _ = load_model(model_path, task, device)
                adapter = get_adapter(model)
                pruner = build_pruner(cfg.pruner, pruner_name)
        notes += steps.notes()
        if settings.resume and not steps.read:
            notes.append(f"pruner={pruner_name} keeps no step checkpoints: resume=true ran it from the start")
        with timed(timing, "evaluate_pruned"):
            pruned_metrics = evaluate_model(model, tokenizer, task, data, device,
                                            batch_size=settings.eval_batch_size, notes=notes,
                                            max_examples=settings.eval_max_examples, dtype=eval_dtype)
        int8_metrics = None
        if settings.latency is not None and settings.latency.quantize is not None:
            with timed(timing, "evaluate_pruned_int8"), tempfile.TemporaryDirectory(prefix="kprune-int8-") as scratch:
                # What the latency verification timed is the int8 model: its metric is what a user deploys.
                int8_metrics = evaluate_model(int8_model(model, Path(scratch)), tokenizer, task, data, "cpu",
                                              batch_size=settings.eval_batch_size, notes=notes,
                                              max_examples=settings.eval_max_examples)
        with timed(timing, "save"), write_errors(f"pruned/ into output_dir={output.path}", RESULTS_REMEDY):
            checkpoint_dir = output.path / "pruned"
            checkpoint_bytes = save_pruned(model, tokenizer, checkpoint_dir, dtype=stored_dtype(model_path), task=task)
        if settings.check_reload:
            with timed(timing, "check_reload"):
                notes.append(check_reload(model, checkpoint_dir, task, sample.model_inputs(sample.batches[0], device),
                                          dtype=stored_dtype(model_path)))

        report = build_report(
            cfg=cfg, task=task, pruner=pruner_name, rate=settings.rate, device=device,
            dense_metrics=dense_metrics, pruned_metrics=pruned_metrics,
            flops=flops, dense_structure=dense_structure, pruned_structure=adapter.structure(),
            params=(dense_params, count_parameters(model)),
            checkpoint=(checkpoint_dir, checkpoint_bytes),
            sample=sample, sample_size=str(settings.sample_size), pruner_settings=result.settings, timing={**timing, **{f"prune.{k}": v for k, v in result.timing.items()}},
            notes=notes, peak_memory=peak_memory_mb(device), smoke=settings.smoke,
            deterministic=settings.deterministic, latency=measured, int8_metrics=int8_metrics,
        )
        with write_errors(f"the reports into output_dir={output.path}", RESULTS_REMEDY):
            card = write_model_card(checkpoint_dir, model_card(report, task, model_path, run_command(output.path)))
            report["checkpoint"]["bytes"] += card.stat().st_size  # the card is part of the checkpoint
            write_reports(report, output.path)
        steps.discard()
        output.release()
        print_summary(report)
        return report
    except BaseException as error:
        output.fail(error, OmegaConf.to_container(cfg, resolve=False))
        if not isinstance(error, UserError) and (done := steps.saved_steps()):
            console.print(f"[bold]kprune:[/] {done} finished sub-layers are kept in {escape(str(steps.directory))}: "
                          f"the same command with resume=true continues from there", highlight=False, soft_wrap=True)
        raise
    finally:
        numerics.close()
