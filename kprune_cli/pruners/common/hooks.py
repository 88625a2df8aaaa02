"""Scoped hooks: every hook lives inside a context manager and is removed on exit, also on errors.

- :func:`capture_inputs` records what a module receives (e.g. the ``(batch, seq, heads * d_h)``
  input of an output projection);
- :func:`capture_taps` records the tensors at :class:`~kprune_cli.models.adapters.Tap` places (a
  sub-layer's input, its residual sum), module inputs or outputs alike;
- :func:`scale_inputs` multiplies a module's input by a tensor (unit masks, gradient probes);
- :func:`grad_leaf_input` makes a module's input a leaf that requires grad (where a backward pass stops);
- :func:`forward_until` runs a model only up to a module, or just past it (truncated forward pass);
- :func:`frozen` switches a model's parameters to ``requires_grad=False`` for a while.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Hashable, Iterator, Mapping

import torch
from torch import nn

from kprune_cli.models.adapters import Tap


class StopForward(Exception):
    """Raised by :func:`forward_until`'s hook to end a forward pass early."""


@contextmanager
def capture_inputs(modules: Mapping[Hashable, nn.Module]) -> Iterator[dict[Hashable, torch.Tensor]]:
    """Record the first positional input of each module as ``store[key]`` (the latest call wins).

    The stored tensors are those the module receives, after any pre-hook registered earlier
    (e.g. masks); they are not detached, so gradients may still flow through them.
    """
    with capture_taps({key: Tap(module) for key, module in modules.items()}) as store:
        yield store


@contextmanager
def capture_taps(taps: Mapping[Hashable, Tap]) -> Iterator[dict[Hashable, torch.Tensor]]:
    """Record the tensor at each tap as ``store[key]`` (the latest call wins): a module's first
    positional input (after earlier pre-hooks), or its output (the first element of a tuple)."""
    store: dict[Hashable, torch.Tensor] = {}

    def before(key: Hashable):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            store[key] = args[0]

        return hook

    def after(key: Hashable):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            store[key] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [tap.module.register_forward_hook(after(key)) if tap.after
               else tap.module.register_forward_pre_hook(before(key)) for key, tap in taps.items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def scale_inputs(scales: Mapping[nn.Module, torch.Tensor]) -> Iterator[None]:
    """Multiply the first positional input of each module by its tensor (broadcast) while open.

    A scale of shape ``(batch, 1, width)`` that requires grad gives per-sample gradients of a
    summed loss with respect to every input column.
    """

    def scaler(scale: torch.Tensor):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (args[0] * scale.to(args[0].dtype),) + tuple(args[1:])

        return hook

    handles = [module.register_forward_pre_hook(scaler(scale)) for module, scale in scales.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def grad_leaf_input(module: nn.Module) -> Iterator[None]:
    """Make the first positional input of ``module`` a fresh leaf that requires grad while open.

    In a model whose parameters are :func:`frozen`, the backward pass then stops there, and the
    inputs of later modules (recorded by :func:`capture_inputs` registered afterwards) are
    tensors of the graph whose gradients ``torch.autograd.grad`` can return.
    """

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (args[0].detach().requires_grad_(),) + tuple(args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def forward_until(model: nn.Module, inputs: Mapping[str, torch.Tensor], module: nn.Module | Tap) -> None:
    """Run ``model(**inputs)`` until ``module`` is about to run (or, for a :class:`Tap` with
    ``after``, has run), then stop.

    Hooks on the module registered before this call (e.g. by :func:`capture_inputs` or
    :func:`capture_taps`) still fire, so its input or output can be recorded. Raises
    ``RuntimeError`` if the model never reaches it.
    """
    tap = module if isinstance(module, Tap) else Tap(module)
    module = tap.module

    def stop(*args) -> None:
        raise StopForward

    handle = module.register_forward_hook(stop) if tap.after else module.register_forward_pre_hook(stop)
    try:
        model(**inputs)
    except StopForward:
        return
    finally:
        handle.remove()
    raise RuntimeError(f"the forward pass never reached {module.__class__.__name__}")


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Set ``requires_grad=False`` on all parameters while open; restore the flags on exit.

    Backward passes then stop at the earliest tensor that requires grad (a gradient probe),
    instead of running down to the embeddings.
    """
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
