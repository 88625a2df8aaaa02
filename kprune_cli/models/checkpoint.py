"""Saving pruned models as Hugging Face directories that stock transformers can load.

A checkpoint holds ``model.safetensors``, ``config.json`` (stock ``model_type`` plus
``kprune_structure`` and an ``auto_map`` entry), the tokenizer files and ``modeling_kprune.py``;
``AutoModelFor...from_pretrained(directory, trust_remote_code=True)`` rebuilds the pruned layers.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kprune_cli.models import modeling_kprune
from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.modeling_kprune import STRUCTURE_KEY, auto_map_for
from kprune_cli.outputs import atomic_directory


def save_pruned(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
                dtype: torch.dtype | None = None) -> int:
    """Write ``model`` (pruned or not) and ``tokenizer`` to ``directory``; returns its size in bytes.

    ``dtype`` (default: the model's) is the dtype of the stored weights, e.g. ``torch.float16`` to
    match a half-precision source checkpoint; the model in memory is left untouched. The directory
    is written into a temporary sibling and renamed into place, so a crash never leaves a loadable
    half-model; an existing ``directory`` is replaced.
    """
    directory = Path(directory)
    with atomic_directory(directory, overwrite=True) as staging:
        _write(model, tokenizer, staging, dtype)
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def _write(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
           dtype: torch.dtype | None) -> None:
    """The checkpoint files, written into ``directory``."""
    state_dict = None
    if dtype is not None:
        state_dict = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                      for name, tensor in model.state_dict().items()}
    model.save_pretrained(directory, state_dict=state_dict)
    config = copy.deepcopy(model.config)
    setattr(config, STRUCTURE_KEY, get_adapter(model).structure())
    config.auto_map = auto_map_for(model)
    config.architectures = [name.rsplit(".", 1)[-1] for name in config.auto_map.values()]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(directory)  # replaces the stock config that save_pretrained wrote
    tokenizer.save_pretrained(directory)
    shutil.copyfile(modeling_kprune.__file__, directory / "modeling_kprune.py")
