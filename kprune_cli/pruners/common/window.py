"""Forward passes over a window of encoder layers, fed with cached hidden states.

A sub-layer-wise schedule visits the same sample once per sub-layer, and everything below the
target layer is final by then: the hidden states entering layer ``l`` can be computed once and
every pass can start there instead of at the embeddings. :class:`LayerWindow` does this for
every family without re-implementing their forward: while it is open, the backbone's layer list
(the adapter's ``layer_modules()``, which every family's encoder loops over) holds only layers
``[start, stop)``, and a hook on the embeddings replaces their output with the cached hidden
states. The base model still builds the attention mask (and relative positions, rotary
embeddings) from the inputs and the shape of those states; the embeddings themselves still run
(a lookup and a LayerNorm). A window that stops early ends the pass right after layer
``stop - 1`` (or after the embeddings, when it is empty).

Results are those of a full forward pass, bit for bit: each layer runs the same operations on
the same tensors.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Mapping, Sequence

import torch
from torch import nn
from transformers.utils import ModelOutput

from kprune_cli.models.adapters import ModelAdapter, Tap
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.models.precision import full_precision
from kprune_cli.pruners.common.hooks import StopForward, forward_until


class LayerWindow:
    """Run ``model`` through encoder layers ``[start, stop)`` only (``stop=None``: to the last
    layer, then the task head), starting from given hidden states.

    Use as a context manager. While open, ``adapter.layers()`` sees only the window's layers:
    take module references (and open :func:`~kprune_cli.models.masks.apply_masks`) before.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, start: int = 0, stop: int | None = None) -> None:
        self.model = model
        self.adapter = adapter
        self.layers = adapter.layer_modules()
        self.start, self.stop = start, stop
        self._hidden: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "LayerWindow":
        window = nn.ModuleList(list(self.layers)[self.start:self.stop])
        self._handles.append(self.adapter.embeddings.register_forward_hook(self._feed))
        if self.stop is not None and len(window):
            self._handles.append(window[-1].register_forward_hook(self._leave))
        self.adapter.replace_layer_modules(window)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.adapter.replace_layer_modules(self.layers)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _feed(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """The cached hidden states in place of the embeddings' output; the end of an empty window."""
        hidden = output if self._hidden is None else self._hidden
        if self.stop is not None and self.stop <= self.start:
            self._leave(module, args, hidden)
        return None if self._hidden is None else hidden

    def _leave(self, module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        self._output = output[0] if isinstance(output, tuple) else output
        raise StopForward

    def __call__(self, inputs: Mapping[str, torch.Tensor], hidden: torch.Tensor | None = None
                 ) -> ModelOutput | torch.Tensor:
        """The model's outputs on ``inputs`` with ``hidden`` ``(batch, seq, d)`` entering layer
        ``start`` (``None``: the embeddings' output); with ``stop`` set, the hidden states leaving
        layer ``stop - 1`` ``(batch, seq, d)`` instead (the task head does not run)."""
        self._hidden = hidden
        try:
            return self.model(**inputs)
        except StopForward:
            output, self._output = self._output, None
            return output
        finally:
            self._hidden = None

    def until(self, inputs: Mapping[str, torch.Tensor], module: nn.Module | Tap,
              hidden: torch.Tensor | None = None) -> None:
        """Run until ``module`` is about to run (see :func:`~kprune_cli.pruners.common.hooks.forward_until`)."""
        self._hidden = hidden
        try:
            forward_until(self.model, inputs, module)
        finally:
            self._hidden = None


@torch.no_grad()
def encoder_inputs(model: nn.Module, adapter: ModelAdapter, batches: Sequence[Mapping[str, torch.Tensor]]
                   ) -> list[torch.Tensor]:
    """Per batch of model inputs, the hidden states entering the first layer ``(batch, seq, d)``
    (float32 also after a half-precision pass)."""
    with LayerWindow(model, adapter, 0, 0) as window:
        return [full_precision(window(inputs)) for inputs in batches]


@torch.no_grad()
def advance(model: nn.Module, adapter: ModelAdapter, masks: Masks | None, layer: int,
            batches: Sequence[Mapping[str, torch.Tensor]], hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run layer ``layer`` (with ``masks`` applied, if any) on the hidden states entering it:
    per batch, the hidden states entering layer ``layer + 1`` ``(batch, seq, d)`` (float32 also after a
    half-precision pass)."""
    with apply_masks(adapter, masks) if masks is not None else nullcontext(), \
            LayerWindow(model, adapter, layer, layer + 1) as window:
        return [full_precision(window(inputs, states)) for inputs, states in zip(batches, hidden)]
