"""``kprune run``: config → load → calibration sample → prune → evaluate → save → report.

Each arrow is one function call with plain inputs; the pruner sees no config or file.
Outputs are staged: the checkpoint and the reports appear under ``output_dir`` only once
complete, and a run that fails leaves ``FAILED.json`` (error + config) instead.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kprune_cli.calibration import draw_calibration_sample
from kprune_cli.errors import UserError
from kprune_cli.evaluation import evaluate_model, measure_avg_seq_len
from kprune_cli.flops import FlopsModel
from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.checkpoint import save_pruned
from kprune_cli.models.loading import count_parameters, load_model, resolve_device, stored_dtype
from kprune_cli.models.slicing import prune_physically
from kprune_cli.outputs import OutputDir
from kprune_cli.pruners.base import PruneProblem
from kprune_cli.report import Report, build_report, peak_memory_mb, print_summary, write_reports
from kprune_cli.resolve import resolve_data_dir, resolve_model_path
from kprune_cli.tasks.data import load_task_data
from kprune_cli.tasks.spec import get_task


def validate_rate(rate: Any) -> float:
    """``rate`` as a float in (0, 1), or a :class:`UserError` naming it."""
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise UserError(f"rate={rate!r} is not a number: give the fraction of FLOPs to remove, 0 < rate < 1") from None
    if not 0.0 < value < 1.0:
        raise UserError(f"rate={rate!r} is out of range: give the fraction of FLOPs to remove, 0 < rate < 1")
    return value


@dataclass
class StageTimer:
    """Wall-clock seconds per pipeline stage, in the order they ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def run_pruning(cfg: DictConfig) -> Report:
    """Run one pruning job described by ``cfg`` (configs/run.yaml) and return its report."""
    output = OutputDir(Path(str(cfg.output_dir)), overwrite=bool(cfg.overwrite))
    try:
        rate = validate_rate(cfg.rate)
        task = get_task(str(cfg.task.name))
        device = resolve_device(str(cfg.device))
        output.claim()
    except UserError:
        output.discard_if_empty()
        raise
    pruner_name = HydraConfig.get().runtime.choices.get("pruner", "custom") if HydraConfig.initialized() else "custom"
    timer = StageTimer()
    try:
        torch.manual_seed(int(cfg.seed))
        with timer.stage("load"):
            model_path, notes = resolve_model_path(str(cfg.model.path), task, device)
            data = load_task_data(task, resolve_data_dir(task, cfg.data_dir))
            model, tokenizer = load_model(model_path, task, device)
            adapter = get_adapter(model)
            pruner = instantiate(cfg.pruner)

        seq_len = task.avg_seq_len
        if seq_len is None:
            seq_len = measure_avg_seq_len(task, data[task.eval_splits[0]], tokenizer)
        flops = FlopsModel(adapter.hidden_size, adapter.head_size, seq_len)
        dense_structure = adapter.structure()
        dense_params = count_parameters(model)

        with timer.stage("evaluate_dense"):
            dense_metrics = evaluate_model(model, tokenizer, task, data, device, batch_size=int(cfg.eval_batch_size))
        with timer.stage("calibration"):
            sample = draw_calibration_sample(
                task, data[task.train_split], tokenizer,
                num_tokens=int(cfg.calibration.num_tokens), seed=int(cfg.calibration.seed),
                batch_size=int(cfg.calibration.batch_size),
            )
        problem = PruneProblem(model=model, adapter=adapter, task=task, sample=sample, flops=flops,
                               rate=rate, device=device, seed=int(cfg.seed))
        with timer.stage("prune"):
            result = pruner.prune(problem)
            prune_physically(adapter, result.masks)
        with timer.stage("evaluate_pruned"):
            pruned_metrics = evaluate_model(model, tokenizer, task, data, device, batch_size=int(cfg.eval_batch_size))
        with timer.stage("save"):
            checkpoint_dir = output.path / "pruned"
            checkpoint_bytes = save_pruned(model, tokenizer, checkpoint_dir, dtype=stored_dtype(model_path))

        report = build_report(
            cfg=cfg, task=task, pruner=pruner_name, rate=rate, device=device,
            dense_metrics=dense_metrics, pruned_metrics=pruned_metrics,
            flops=flops, dense_structure=dense_structure, pruned_structure=adapter.structure(),
            params=(dense_params, count_parameters(model)),
            checkpoint=(checkpoint_dir, checkpoint_bytes),
            sample=sample, timing={**timer.seconds, **{f"prune.{k}": v for k, v in result.timing.items()}},
            notes=[*notes, *data.notes, *result.notes], peak_memory=peak_memory_mb(device),
        )
        write_reports(report, output.path)
        output.release()
        print_summary(report)
        return report
    except BaseException as error:
        output.fail(error, OmegaConf.to_container(cfg, resolve=False))
        raise
