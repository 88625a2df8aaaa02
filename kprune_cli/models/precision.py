"""Half-precision forward passes of a float32 model (``pruner.autocast``, ``pruner.autocast_scope``,
``eval_dtype``).

The model's weights stay float32. A pass runs under :func:`torch.autocast` in bfloat16 or float16,
so its matrix products use the hardware's half-precision units where it has them; everything the
pruner computes *from* a pass (knowledge, normal equations, solves) stays float32/float64:

- :func:`autocast_passes`: a region of code whose operations run under autocast (K-prune's
  measurement passes, whose backward pass is part of the region);
- :func:`autocast_forward`: only the model's own forward runs under autocast, its floating outputs
  come back float32, and what the caller does with them does not (the teacher's targets and
  residual sums, the KPWT and hidden-state passes with ``pruner.autocast_scope=all``);
- :func:`full_precision`: a tensor a hook captured inside such a pass, back in float32.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from kprune_cli.runtime.precision import PRECISIONS

AUTOCAST_DTYPES = {name: dtype for name, dtype in PRECISIONS.items() if dtype is not None}
"""Values of ``pruner.autocast`` besides ``false``: the half precisions by name, ``bf16`` and ``fp16``."""

HALF_DTYPES = (torch.float16, torch.bfloat16)


def full_precision(values: torch.Tensor) -> torch.Tensor:
    """``values`` in float32 if autocast made them half precision, else as they are (the same tensor)."""
    return values.float() if values.dtype in HALF_DTYPES else values


@contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run ``model``'s attention as plain matmuls and a softmax inside the block (transformers
    reads ``config._attn_implementation`` at every forward).

    Under bf16 autocast on a CPU, torch's fused SDPA kernel is slow backwards: on MiniLM-MRPC
    its backward was a third of the profiled pass (about 0.4 s per call for a 32-sequence
    micro-batch), where eager attention's batched matmuls run on the CPU's bf16 matrix units and
    cut the pruning's CPU time by a fifth (``python -m benchmarks --sections profile``; README,
    Performance).
    """
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


@contextmanager
def autocast_passes(model: PreTrainedModel, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """The region runs under ``torch.autocast(device.type, dtype)``; on a CPU, ``model``'s attention
    is eager inside it (:func:`eager_attention`)."""
    with torch.autocast(device.type, dtype=dtype):
        if device.type != "cpu":
            yield
            return
        with eager_attention(model):
            yield


@contextmanager
def autocast_forward(model: PreTrainedModel, dtype: torch.dtype | None) -> Iterator[None]:
    """While open, every call of ``model`` runs its forward under :func:`autocast_passes` in ``dtype``
    and returns its floating outputs in float32 (``None``: nothing changes).

    Only the forward is affected: products the caller computes from the outputs, or from tensors
    its hooks captured (pass those through :func:`full_precision`), run in the caller's precision.
    The model's own ``forward`` is restored on exit, also after an exception.
    """
    if dtype is None:
        yield
        return
    device = next(model.parameters()).device
    forward, own = model.forward, "forward" in vars(model)

    def half_precision_forward(*args: Any, **kwargs: Any) -> Any:
        with autocast_passes(model, device, dtype):
            outputs = forward(*args, **kwargs)
        return _in_full_precision(outputs)

    model.forward = half_precision_forward
    try:
        yield
    finally:
        if own:
            model.forward = forward
        else:
            del model.forward  # the class's forward shows through again


def _in_full_precision(outputs: Any) -> Any:
    """A model's ``outputs`` (a tensor, a :class:`ModelOutput` or a tuple) with half-precision tensors
    in float32."""
    if isinstance(outputs, torch.Tensor):
        return full_precision(outputs)
    if isinstance(outputs, ModelOutput):
        for key, value in outputs.items():
            if isinstance(value, torch.Tensor):
                outputs[key] = full_precision(value)
        return outputs
    if isinstance(outputs, tuple):
        return tuple(_in_full_precision(value) for value in outputs)
    return outputs
