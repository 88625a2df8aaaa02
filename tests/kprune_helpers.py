"""Hand-made calibration samples and pruning problems for the K-prune unit tests."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel

from kprune_cli.models.adapters import ModelAdapter, get_adapter
from kprune_cli.models.flops import FlopsModel
from kprune_cli.models.masks import Masks
from kprune_cli.pruners.base import PruneProblem
from kprune_cli.tasks.calibration import CalibrationSample
from kprune_cli.tasks.spec import TASKS

TINY_FLOPS = FlopsModel(hidden_size=32, head_size=8, seq_len=12)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="needs a CUDA GPU")])]
"""Devices to parametrise a test over: its CUDA twin runs with ``pytest -m cuda`` on a GPU machine."""
TASK_OF_HEAD = {"classification": "mrpc", "regression": "stsb", "qa": "squad"}


def make_sample(model: PreTrainedModel, num: int = 16, seq: int = 12, batch: int = 8, seed: int = 0) -> CalibrationSample:
    """``num`` random sequences (ids < 100) of 4..``seq`` real tokens, right-padded, in batches of ``batch``."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, seq + 1, (num,), generator=generator)
    attention_mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(5, 100, (num, seq), generator=generator) * attention_mask
    columns = {"input_ids": input_ids, "attention_mask": attention_mask}
    if model.config.model_type != "distilbert":
        columns["token_type_ids"] = (torch.arange(seq)[None, :] >= lengths[:, None] // 2).long() * attention_mask
    return CalibrationSample([
        {key: value[start:start + batch] for key, value in columns.items()} for start in range(0, num, batch)
    ])


def sharpen(model: PreTrainedModel, factor: float = 10.0) -> PreTrainedModel:
    """Scale every Linear weight by ``factor``: a freshly initialised tiny model (std 0.02) predicts
    almost uniformly, so distillation gradients would be too small to test anything."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(factor)
    return model


def make_problem(model: PreTrainedModel, task: str = "mrpc", rate: float = 0.5,
                 sample: CalibrationSample | None = None, device: str = "cpu") -> PruneProblem:
    """A pruning problem on the tiny-model FLOPs model (hidden 32, head size 8, S = 12); the model
    is moved to ``device``."""
    return PruneProblem(
        model=model.to(device), adapter=get_adapter(model), task=TASKS[task],
        sample=sample if sample is not None else make_sample(model),
        flops=TINY_FLOPS, rate=rate, device=torch.device(device),
    )


def partial_masks(adapter: ModelAdapter) -> Masks:
    """Masks of a 2-layer tiny model with some heads and neurons of every sub-layer pruned."""
    masks = Masks.ones(adapter)
    masks.heads[0][:2] = 0.0
    masks.neurons[0][::3] = 0.0
    masks.heads[1][1] = 0.0
    masks.neurons[1][::2] = 0.0
    return masks
