"""Forward passes over a window of encoder layers, fed with cached hidden states.

A sub-layer-wise schedule visits the same sample once per sub-layer, and everything below the
target layer is final by then: the hidden states entering layer ``l`` can be computed once and
every pass can start there instead of at the embeddings. :class:`LayerWindow` does this for
every family without re-implementing their forward: while it is open, the encoder's layer list
(``encoder.layer``, looped over by BERT's encoder and DistilBERT's transformer alike) holds only
layers ``[start, stop)``, and a pre-hook on the encoder replaces the hidden states it receives
(the embeddings' output) with the cached ones. The base model still builds the attention mask
from ``attention_mask``; position and token-type embeddings do not matter since the embeddings'
output is replaced. The embeddings themselves still run (a lookup and a LayerNorm).

Results are those of a full forward pass, bit for bit: each layer runs the same operations on
the same tensors.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from transformers.utils import ModelOutput

from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.masks import Masks, apply_masks
from kprune_cli.pruners.common.hooks import StopForward, forward_until


def encoder_of(adapter: ModelAdapter) -> nn.Module:
    """The module whose ``layer`` attribute is the model's list of transformer layers."""
    layers = adapter.layer_modules()
    for module in adapter.backbone.children():
        if getattr(module, "layer", None) is layers:
            return module
    raise RuntimeError(f"no child of {type(adapter.backbone).__name__} holds the layer list as `.layer`")


class LayerWindow:
    """Run ``model`` through encoder layers ``[start, stop)`` only (``stop=None``: to the last
    layer, then the task head), starting from given hidden states.

    Use as a context manager. While open, ``adapter.layers()`` sees only the window's layers:
    take module references (and open :func:`~kprune_cli.models.masks.apply_masks`) before.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, start: int = 0, stop: int | None = None) -> None:
        self.model = model
        self.encoder = encoder_of(adapter)
        self.layers = adapter.layer_modules()
        self.start, self.stop = start, stop
        self._hidden: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "LayerWindow":
        self._handles.append(self.encoder.register_forward_pre_hook(self._feed, with_kwargs=True))
        if self.stop is not None:
            self._handles.append(self.encoder.register_forward_hook(self._leave))
        self.encoder.layer = nn.ModuleList(list(self.layers)[self.start:self.stop])
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.encoder.layer = self.layers
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _feed(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._hidden is None:
            return None
        if args:
            return (self._hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._hidden}

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._output = output[0] if isinstance(output, tuple) else output.last_hidden_state
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

    def until(self, inputs: Mapping[str, torch.Tensor], module: nn.Module, hidden: torch.Tensor | None = None) -> None:
        """Run until ``module`` is about to run (see :func:`~kprune_cli.pruners.common.hooks.forward_until`)."""
        self._hidden = hidden
        try:
            forward_until(self.model, inputs, module)
        finally:
            self._hidden = None


@torch.no_grad()
def encoder_inputs(model: nn.Module, adapter: ModelAdapter, batches: Sequence[Mapping[str, torch.Tensor]]
                   ) -> list[torch.Tensor]:
    """Per batch of model inputs, the hidden states entering the first layer ``(batch, seq, d)``."""
    with LayerWindow(model, adapter, 0, 0) as window:
        return [window(inputs) for inputs in batches]


@torch.no_grad()
def advance(model: nn.Module, adapter: ModelAdapter, masks: Masks | None, layer: int,
            batches: Sequence[Mapping[str, torch.Tensor]], hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run layer ``layer`` (with ``masks`` applied, if any) on the hidden states entering it:
    per batch, the hidden states entering layer ``layer + 1`` ``(batch, seq, d)``."""
    with apply_masks(adapter, masks) if masks is not None else nullcontext(), \
            LayerWindow(model, adapter, layer, layer + 1) as window:
        return [window(inputs, states) for inputs, states in zip(batches, hidden)]
