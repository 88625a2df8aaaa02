"""Int8 dynamic quantization of an exported ONNX model (``kprune export quantize=int8``), and an
ONNX Runtime session that answers like a Hugging Face model, so the task metrics of ``kprune eval``
(kprune_cli/core/evaluation.py) can be computed on the quantized model unchanged.

Dynamic quantization stores the weights of the encoder's matrix products as int8 and quantizes
each activation to uint8 on the fly (per tensor, from its own range), so it needs no calibration
data. The settings, and why (:data:`INT8_SETTINGS`):

- ``op_types_to_quantize=["MatMul"]``: every ``nn.Linear`` of the encoder (query/key/value, attention
  output, both FFN matrices) is exported as ``MatMul`` + ``Add``; those carry nearly all the FLOPs.
  The pooler and classifier (``Gemm`` on 2-D inputs) are rewritten by the quantizer as ``MatMul`` +
  ``Add`` and quantized too. The embeddings (``Gather``) stay float32: quantizing them makes the
  file smaller, not faster, and costs accuracy.
- ``MatMulConstBOnly`` (ONNX Runtime's default for dynamic mode, written out): only products with a
  constant weight are quantized; attention's activation x activation products (Q K^T, P V) stay
  float32, where quantizing the softmax probabilities per tensor would lose the small ones.
- Products whose weight has no elements (a sub-layer pruned to nothing) are left out
  (:func:`empty_products`): ONNX Runtime's per-channel quantizer fails on them.
- ``per_channel=True``: one scale per output column of each weight. Pruned (sliced) weights keep
  columns of very different ranges; a single per-tensor scale would flatten the small ones.
- ``reduce_range=True``: 7-bit weights. On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI)
  ONNX Runtime's u8 x s8 kernel sums pairs of products in int16 and can saturate with full 8-bit
  weights (ONNX Runtime's quantization docs); 7 bits cannot saturate there, on any x86 CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel

from kprune_cli.deploy.onnx_model import ONNX_FILE, export_onnx, ort_session, run_session
from kprune_cli.runtime.errors import UserError

if TYPE_CHECKING:
    import onnxruntime

QUANTIZATIONS = ("int8",)
INT8_FILE = "model.int8.onnx"
INT8_SETTINGS: dict[str, Any] = {
    "method": "onnxruntime.quantization.quantize_dynamic",
    "weight_type": "QInt8",
    "activations": "uint8, dynamic per-tensor range",
    "op_types_to_quantize": ["MatMul"],
    "per_channel": True,
    "reduce_range": True,
    "extra_options": {"MatMulConstBOnly": True},
}
"""What :func:`quantize_int8` does, as ``export.json`` records it (the reasons: the module docstring)."""


def check_quantize(value: Any) -> str | None:
    """``quantize``: null (float32 only) or one of :data:`QUANTIZATIONS`; else a :class:`UserError`."""
    if value is None or value in QUANTIZATIONS:
        return value
    raise UserError(f"quantize={value!r} is not allowed: choose null or one of {', '.join(QUANTIZATIONS)}")


def quantize_int8(source: Path, target: Path) -> dict[str, Any]:
    """Write ``source`` (a float32 ONNX model) to ``target`` with int8 weights (:data:`INT8_SETTINGS`);
    return the settings with both files' sizes in bytes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    empty = empty_products(source)

    # ONNX Runtime logs a warning on the root logger suggesting shape-inference pre-processing; that
    # serves static quantization's calibration, not the dynamic MatMul quantization done here.
    disabled = logging.root.manager.disable
    logging.disable(max(disabled, logging.WARNING))
    try:
        quantize_dynamic(source, target, op_types_to_quantize=INT8_SETTINGS["op_types_to_quantize"],
                         per_channel=INT8_SETTINGS["per_channel"], reduce_range=INT8_SETTINGS["reduce_range"],
                         weight_type=QuantType.QInt8, extra_options=dict(INT8_SETTINGS["extra_options"]),
                         nodes_to_exclude=empty)
    finally:
        logging.disable(disabled)
    return {"format": "int8", "file": target.name, **INT8_SETTINGS, "empty_products_left_float": len(empty),
            "bytes": {"float32": source.stat().st_size, "int8": target.stat().st_size}}


def empty_products(path: Path) -> list[str]:
    """Names of the ``MatMul`` / ``Gemm`` nodes of the ONNX model at ``path`` whose weight has no
    elements: the Linears of a sub-layer pruned to nothing (0 heads or 0 neurons), e.g. ``(hidden, 0)``.
    There is nothing to quantize in them, and ONNX Runtime's per-channel quantizer fails on them."""
    import onnx

    graph = onnx.load(str(path)).graph
    empty = {tensor.name for tensor in graph.initializer if 0 in tensor.dims}
    return [node.name for node in graph.node if node.op_type in ("MatMul", "Gemm") and empty & set(node.input)]


class SessionModel(nn.Module):
    """An ONNX Runtime session called like a Hugging Face model: ``model(**inputs)`` with torch
    tensors ``(batch, seq)`` returns ``{name: tensor}`` for each graph output (``logits``
    ``(batch, num_labels)``, ``start_logits`` / ``end_logits`` ``(batch, seq)`` or
    ``sentence_embedding`` ``(batch, hidden)``), float32 on the CPU. It has no parameters; train/eval mode changes nothing."""

    def __init__(self, session: onnxruntime.InferenceSession) -> None:
        super().__init__()
        self.session = session
        self.outputs = [node.name for node in session.get_outputs()]

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        found = run_session(self.session, inputs)
        return {name: torch.from_numpy(value) for name, value in zip(self.outputs, found)}


def int8_model(model: PreTrainedModel, directory: Path) -> SessionModel:
    """``model`` as ``kprune export quantize=int8`` writes it (exported and quantized into ``directory``),
    opened as an ONNX Runtime CPU session called like ``model``."""
    source, target = directory / ONNX_FILE, directory / INT8_FILE
    export_onnx(model, source)
    quantize_int8(source, target)
    return SessionModel(ort_session(target))


def int8_sessions(paths: dict[str, Path]) -> dict[str, onnxruntime.InferenceSession]:
    """Each float32 ONNX model of ``paths`` (role: file) quantized beside it (``<stem>.int8.onnx``)
    and opened as an ONNX Runtime CPU session (:func:`ort_session`), per role."""
    sessions = {}
    for role, path in paths.items():
        target = path.with_name(f"{path.stem}.int8.onnx")
        quantize_int8(path, target)
        sessions[role] = ort_session(target)
    return sessions

