"""Models of a given structure (kept heads and neurons per layer) with the shape and code of a real one.

Latency depends on a model's shapes, not on its weights, so a latency table
(:mod:`kprune_cli.core.latency_table`) times models built here: the class of the model given (its
stock class: the checkpoint's pruned class runs the same layers), its config with as many layers as
the structure has, random weights, and each layer shrunk by the same surgery that a pruned
checkpoint is rebuilt with (:func:`~kprune_cli.models.families.kprune_common.resize_to_structure`),
so an emptied sub-layer runs as a pruned checkpoint runs it.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from kprune_cli.models.checkpoint import stock_class
from kprune_cli.models.families import layout_of
from kprune_cli.models.families.kprune_common import resize_to_structure


def model_with_structure(model: PreTrainedModel, structure: list[dict[str, int]], seed: int = 0) -> PreTrainedModel:
    """A float32 model in eval mode on the CPU, of ``model``'s class and config, with
    ``len(structure) >= 1`` layers keeping ``structure[l]`` = ``{"heads": h, "neurons": n}`` units (random
    weights, from ``seed``)."""
    if not structure:
        raise ValueError("a model needs at least one layer (some families' code divides by their number)")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(structure)
    if isinstance(getattr(config, "layer_types", None), list):  # ModernBERT: an attention kind per layer
        kinds = model.config.layer_types
        config.layer_types = [kinds[index % len(kinds)] for index in range(config.num_hidden_layers)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = stock_class(model)(config)
    resize_to_structure(built, layout_of(config), structure)
    return built.float().eval()
