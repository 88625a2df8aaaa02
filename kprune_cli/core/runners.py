"""The runtimes a latency budget is measured on: a model made into a call that runs one batch.

``torch``: PyTorch eager on the run's device (CPU, or CUDA with the call synchronised, so the wall
clock covers the kernels), float32, under ``torch.inference_mode``. ``onnxruntime``: the model
exported by :func:`~kprune_cli.deploy.onnx_model.export_onnx` (as ``kprune export`` exports it) and
run by an ONNX Runtime CPU session with :func:`~kprune_cli.deploy.onnx_model.ort_session`'s options
(as deployed: ``threads`` intra-op threads, one inter-op thread); with ``quantize="int8"`` the export
is quantized first as ``kprune export quantize=int8`` quantizes it
(:func:`~kprune_cli.deploy.quantization.quantize_int8`). Inputs are a random batch
``(batch_size, seq_len)`` without padding.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from transformers import PreTrainedModel

from kprune_cli.core.latency import forward_call
from kprune_cli.deploy.onnx_model import example_inputs, require_onnx
from kprune_cli.runtime.errors import UserError

RUNTIMES = ("torch", "onnxruntime")
"""Values of ``latency.runtime``."""


@dataclass(frozen=True)
class RuntimeShape:
    """Where and how a model is timed: ``runtime`` (one of :data:`RUNTIMES`), ``device``, intra-op
    ``threads``, the batch ``(batch_size, seq_len)``, and ``quantize`` (``None``: float32; ``"int8"``:
    ONNX Runtime's int8 model)."""

    runtime: str
    device: torch.device
    threads: int
    batch_size: int
    seq_len: int
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise UserError(f"latency.runtime={self.runtime}: choose {' or '.join(RUNTIMES)}")
        if self.quantize is not None and self.runtime != "onnxruntime":
            raise UserError(f"latency.quantize={self.quantize} times ONNX Runtime's quantized models: give "
                            f"latency.runtime=onnxruntime (not {self.runtime})")
        if self.runtime == "onnxruntime" and self.device.type != "cpu":
            raise UserError(f"latency.runtime=onnxruntime runs on the CPU: give latency.device=cpu "
                            f"(not {self.device}), or latency.runtime=torch to time on {self.device}")
        if self.runtime == "onnxruntime":
            require_onnx()

    @property
    def runtime_name(self) -> str:
        """``torch``, ``onnxruntime`` or ``onnxruntime int8``."""
        return f"{self.runtime} {self.quantize}" if self.quantize else self.runtime

    def float32(self) -> RuntimeShape:
        """The same shape without quantization: where the dense float32 model is timed beside int8 ones."""
        return replace(self, quantize=None)

    def describe(self) -> str:
        """E.g. ``onnxruntime int8 on cpu, 2 threads, batch 32 x 128 tokens``."""
        return (f"{self.runtime_name} on {self.device}, {self.threads} thread{'s' * (self.threads != 1)}, "
                f"batch {self.batch_size} x {self.seq_len} tokens")


class Runner:
    """Makes models into calls that run one batch of ``shape`` on its runtime; files it needs (ONNX
    exports) live in a scratch directory until :meth:`close`."""

    def __init__(self, shape: RuntimeShape) -> None:
        self.shape = shape
        self._scratch = tempfile.TemporaryDirectory(prefix="kprune-latency-") if shape.runtime == "onnxruntime" \
            else None
        self._made = 0

    def prepare(self, model: PreTrainedModel) -> Callable[[], object]:
        """A call that runs ``model`` once on a random batch and returns when it is done."""
        if self.shape.runtime == "onnxruntime":
            return self._onnx_call(model)
        return forward_call(model, self.shape.batch_size, self.shape.seq_len, self.shape.device)

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()

    def _onnx_call(self, model: PreTrainedModel) -> Callable[[], object]:
        import numpy as np

        from kprune_cli.deploy.onnx_model import export_onnx, ort_session

        path = Path(self._scratch.name) / f"model-{self._made}.onnx"
        self._made += 1
        export_onnx(model, path)
        if self.shape.quantize is not None:
            from kprune_cli.deploy.quantization import quantize_int8

            path, source = path.with_suffix(".int8.onnx"), path
            quantize_int8(source, path)
            source.unlink()
        session = ort_session(path, self.shape.threads)
        batch = example_inputs(model, self.shape.batch_size, self.shape.seq_len, ragged=False)
        # A graph drops the inputs it does not use (the mask of a model without attention).
        feed = {node.name: batch[node.name].numpy().astype(np.int64) for node in session.get_inputs()}
        return lambda: session.run(None, feed)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op PyTorch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
