"""A checkpoint (dense or pruned) as an ONNX model, checked against PyTorch, and run by ONNX Runtime.

The export traces the model with torch's TorchScript-based exporter (``dynamo=False``: it needs
only the ``onnx`` package, not ``onnxscript``), with dynamic batch and sequence axes. Pruned
layers keep their own head and neuron counts (they are plain smaller ``Linear`` weights), and an
emptied sub-layer is its residual path, as in PyTorch. ``onnx`` and ``onnxruntime`` are the
optional extra ``.[deploy]``.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.timing import time_in_turns
from kprune_cli.tasks.kinds.embedding import EMBEDDING_OUTPUT, has_pooling

if TYPE_CHECKING:
    import onnxruntime

OPSET = 17
ONNX_FILE = "model.onnx"
MATCH_TOLERANCE = 1e-4
"""Largest absolute difference allowed between the ONNX model's outputs and PyTorch's."""
DEPLOY_PACKAGES = ("onnx", "onnxruntime")


def onnx_available() -> bool:
    """Whether the optional ``.[deploy]`` packages are installed."""
    return all(importlib.util.find_spec(name) is not None for name in DEPLOY_PACKAGES)


def require_onnx() -> None:
    """A :class:`UserError` saying how to install the ``.[deploy]`` extra when it is missing."""
    missing = [name for name in DEPLOY_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"ONNX needs {' and '.join(missing)}: pip install -e '.[deploy]' (or pip install onnx "
                        f"onnxruntime)")


def input_names(model: PreTrainedModel) -> list[str]:
    """The model inputs the ONNX graph takes: ``input_ids``, ``attention_mask`` and, for models with
    segment embeddings (not DistilBERT), ``token_type_ids``."""
    names = ["input_ids", "attention_mask"]
    if getattr(model.config, "type_vocab_size", 0):
        names.append("token_type_ids")
    return names


def output_names(model: PreTrainedModel) -> list[str]:
    """``logits`` ``(batch, num_labels)``, ``start_logits`` / ``end_logits`` ``(batch, seq)`` for QA, or
    ``sentence_embedding`` ``(batch, hidden)`` for a bare encoder with sentence pooling attached
    (:func:`~kprune_cli.tasks.kinds.embedding.attach_pooling`: the pooling, and normalisation where the
    model has it, are traced into the graph)."""
    if has_pooling(model):
        return [EMBEDDING_OUTPUT]
    return ["start_logits", "end_logits"] if "QuestionAnswering" in type(model).__name__ else ["logits"]


def per_sequence(name: str) -> bool:
    """Whether output ``name`` has one row per sequence ``(batch, ...)`` rather than one per token."""
    return name in ("logits", EMBEDDING_OUTPUT)


class _PositionalInputs(nn.Module):
    """The model with positional inputs and a tuple of plain tensors out, as the tracer needs."""

    def __init__(self, model: PreTrainedModel, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        super().__init__()
        self.model, self.inputs, self.outputs = model, list(inputs), list(outputs)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = self.model(**dict(zip(self.inputs, tensors)))
        return tuple(result[name] for name in self.outputs)


def example_inputs(model: PreTrainedModel, batch_size: int = 2, seq_len: int = 16, seed: int = 0,
                   ragged: bool = True) -> dict[str, torch.Tensor]:
    """Random ``(batch_size, seq_len)`` inputs for ``model``; with ``ragged`` the rows after the
    first end in padding of different lengths (so masking is exercised)."""
    generator = torch.Generator().manual_seed(seed)
    vocab_size = int(model.config.vocab_size)
    ids = torch.randint(min(5, vocab_size - 1), vocab_size, (batch_size, seq_len), generator=generator)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if ragged:
        for row in range(1, batch_size):
            mask[row, max(1, seq_len - row * seq_len // (2 * batch_size)):] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {name: inputs[name] for name in input_names(model)}


def export_onnx(model: PreTrainedModel, path: Path) -> None:
    """Write ``model`` to ``path`` as ONNX (float32, traced on the CPU in eval mode; ``model`` is put in
    eval mode) with dynamic batch and sequence axes. ``model`` keeps its device and precision: one on a
    GPU or not in float32 is exported from a float32 CPU copy (``Module.float()`` and ``.cpu()`` would
    convert it in place, and a run would go on with it)."""
    require_onnx()
    parameter = next(model.parameters(), None)
    if parameter is not None and (parameter.device.type != "cpu" or parameter.dtype != torch.float32):
        model = copy.deepcopy(model).float().cpu()
    model.eval()
    inputs, outputs = input_names(model), output_names(model)
    sample = example_inputs(model)
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
    axes |= {name: {0: "batch"} if per_sequence(name) else {0: "batch", 1: "sequence"} for name in outputs}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The tracer warns that Python conditions on shapes become constants; export_onnx's caller
        # checks the outputs on other shapes (check_onnx_matches), so they are not shown.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        # The wrapper in eval mode too: the exporter restores the wrapper's mode onto every submodule.
        wrapper = _PositionalInputs(model, inputs, outputs).eval()
        torch.onnx.export(wrapper, tuple(sample[name] for name in inputs),
                          str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False)


def ort_session(path: Path, threads: int | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session of ``path`` with ``threads`` intra-op threads (default: torch's)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(session: onnxruntime.InferenceSession, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """The session's outputs on ``inputs`` (int64 tensors, as the graph takes them)."""
    names = [node.name for node in session.get_inputs()]
    return session.run(None, {name: inputs[name].cpu().numpy().astype(np.int64) for name in names})


def onnx_difference(model: PreTrainedModel, session: onnxruntime.InferenceSession,
                    inputs: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between ``model``'s outputs and the ONNX session's on ``inputs``."""
    with torch.no_grad():
        expected = model(**{name: value.to(model.device) for name, value in inputs.items()})
    found = run_session(session, inputs)
    return max(float(np.abs(expected[name].float().cpu().numpy() - value).max())
               for name, value in zip(output_names(model), found))


def check_onnx_matches(model: PreTrainedModel, session: onnxruntime.InferenceSession,
                       inputs: dict[str, torch.Tensor]) -> float:
    """:func:`onnx_difference`, or a RuntimeError when it exceeds :data:`MATCH_TOLERANCE`."""
    difference = onnx_difference(model, session, inputs)
    if not difference <= MATCH_TOLERANCE:
        raise RuntimeError(f"the ONNX model's outputs differ from PyTorch's by up to {difference:.3g} "
                           f"(allowed: {MATCH_TOLERANCE:g}); nothing was written")
    return difference


def interleaved_session_times(sessions: Sequence[onnxruntime.InferenceSession],
                              inputs: dict[str, torch.Tensor], repeats: int,
                              warmup: int = 3) -> list[list[float]]:
    """Milliseconds of ``repeats`` runs of each session on ``inputs``, timed in turns (one run of
    each per round, as :func:`~kprune_cli.core.latency.interleaved_latency`), after ``warmup``
    untimed runs of each."""
    feeds = [{node.name: inputs[node.name].numpy().astype(np.int64) for node in session.get_inputs()}
             for session in sessions]
    return time_in_turns([partial(session.run, None, feed) for session, feed in zip(sessions, feeds)], repeats, warmup)
