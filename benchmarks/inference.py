"""Speed of pruned models against the dense one, next to their FLOPs reduction.

Latency depends on the pruned structure, not on the method that chose it, so the pruned models
come from magnitude pruning (instant) and are sliced with
:func:`~kprune_cli.models.slicing.prune_physically`.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from transformers import PreTrainedModel

from kprune_cli.core.latency import interleaved_latency
from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.flops import FlopsModel
from kprune_cli.models.slicing import prune_physically
from kprune_cli.pruners.base import PruneProblem
from kprune_cli.pruners.magnitude.pruner import MagnitudePruner
from kprune_cli.tasks.calibration import CalibrationSample
from kprune_cli.tasks.spec import TaskSpec

SPEEDUP_TARGET = 0.8
"""The speedup a pruned model should reach on the CPU at a large batch, as a fraction of its FLOPs ratio."""


def magnitude_pruned(model: PreTrainedModel, task: TaskSpec, flops: FlopsModel, rate: float) -> PreTrainedModel:
    """A copy of ``model`` pruned by weight magnitude to ``rate`` and physically sliced."""
    pruned = copy.deepcopy(model)
    adapter = get_adapter(pruned)
    problem = PruneProblem(model=pruned, adapter=adapter, task=task, sample=CalibrationSample([]), flops=flops,
                           rate=rate, device=pruned.device)
    prune_physically(adapter, MagnitudePruner().prune(problem).masks)
    return pruned


def inference_speed(model: PreTrainedModel, task: TaskSpec, rates: Sequence[float], batch_sizes: Sequence[int],
                    seq_len: int, device: torch.device | str, repeats: int,
                    dtypes: Sequence[torch.dtype | None] = (None,)) -> list[dict]:
    """Latency of the dense ``model`` and of its pruned copies at ``rates``, for every batch size and
    dtype (``None``: float32), the models timed in turns (:func:`interleaved_latency`): one row
    each, with ``flops_ratio`` (dense FLOPs / pruned FLOPs, at the task's FLOPs sequence length),
    ``speedup`` (dense median latency / this one) and ``target_met`` (speedup ≥
    :data:`SPEEDUP_TARGET` × FLOPs ratio)."""
    adapter = get_adapter(model)
    flops = adapter.flops(task.avg_seq_len)
    models = [model, *(magnitude_pruned(model, task, flops, rate) for rate in rates)]
    ratios = [flops.total(adapter.structure()) / flops.total(get_adapter(m).structure()) for m in models]
    rows = []
    for dtype in dtypes:
        for batch_size in batch_sizes:
            figures = interleaved_latency(models, batch_size, seq_len, device, repeats, dtype=dtype)
            for rate, ratio, latency in zip((0.0, *rates), ratios, figures):
                speedup = figures[0]["median_ms"] / latency["median_ms"]
                rows.append({"rate": rate, "flops_ratio": ratio, **latency, "speedup": speedup,
                             "target_met": speedup >= SPEEDUP_TARGET * ratio})
    return rows
