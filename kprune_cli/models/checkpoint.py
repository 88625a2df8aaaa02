"""Saving pruned models as Hugging Face directories that stock transformers can load.

A checkpoint holds ``model.safetensors``, ``config.json`` (stock ``model_type`` plus
``kprune_structure`` and ``auto_map`` entries for ``AutoModel`` and the task's class), the tokenizer
files, and the family's module as ``modeling_kprune.py`` with ``kprune_common.py`` (nothing of the
other families); ``AutoModel...from_pretrained(directory, trust_remote_code=True)`` rebuilds the pruned
layers; :func:`check_reload` proves that a saved one does. A task kind may add files of its own (a
sentence-embedding model: its sentence-transformers modules).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.families import MODELING_FILE, layout_of, modeling_files
from kprune_cli.models.families.kprune_common import STRUCTURE_KEY
from kprune_cli.models.loading import load_model
from kprune_cli.runtime.output_dir import atomic_directory
from kprune_cli.tasks.data import sequence_limit
from kprune_cli.tasks.kinds import kind_of
from kprune_cli.tasks.spec import TaskSpec


def save_pruned(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path,
                dtype: torch.dtype | None = None, task: TaskSpec | None = None) -> int:
    """Write ``model`` (pruned or not) and ``tokenizer`` to ``directory``; returns its size in bytes.

    ``task``: the files its kind adds beside the weights are written too
    (:meth:`~kprune_cli.tasks.kinds.base.TaskKind.write_companions`).

    ``dtype`` (default: the model's) is the dtype of the stored weights, e.g. ``torch.float16`` to
    match a half-precision source checkpoint; the model in memory is left untouched. The directory
    is written into a temporary sibling and renamed into place, so a crash never leaves a loadable
    half-model; an existing ``directory`` is replaced.
    """
    directory = Path(directory)
    with atomic_directory(directory, overwrite=True) as staging:
        _write(model, tokenizer, staging, dtype)
        if task is not None:
            kind_of(task).write_companions(model, staging, sequence_limit(task, tokenizer))
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
    config.architectures = [stock_class(model).__name__]  # also the name of its pruned class
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(directory)  # replaces the stock config that save_pretrained wrote
    tokenizer.save_pretrained(directory)
    for name, source in modeling_files(config.model_type).items():
        shutil.copyfile(source, directory / name)


def stock_class(model: PreTrainedModel) -> type[PreTrainedModel]:
    """The stock transformers class, with a task head or the bare encoder (a sentence-embedding model),
    that ``model`` is or subclasses (a model loaded from a pruned checkpoint is of its pruned subclass)."""
    layout = layout_of(model.config)
    classes = (*layout.task_classes, layout.encoder_class)
    stock = next((cls for cls in type(model).__mro__ if cls in classes), None)
    if stock is None:
        raise ValueError(f"no pruned class for {type(model).__name__}: supported are "
                         f"{', '.join(cls.__name__ for cls in classes)}")
    return stock


def auto_map_for(model: PreTrainedModel) -> dict[str, str]:
    """The config ``auto_map`` that loads ``model``'s checkpoint as its family module's pruned classes,
    named like the stock ones: the bare encoder (``AutoModel``, features) and the task class (none for a
    bare encoder, a sentence-embedding model)."""
    stock = stock_class(model)
    module = MODELING_FILE.removesuffix(".py")
    head = "".join(stock.__name__.partition("For")[1:])  # "ForSequenceClassification"; "" for the bare encoder
    encoder = layout_of(model.config).encoder_class
    return {"AutoModel": f"{module}.{encoder.__name__}", f"AutoModel{head}": f"{module}.{stock.__name__}"}


RELOAD_TOLERANCE = 1e-4
"""Largest absolute output difference allowed between a reloaded checkpoint and the pruned model
(with its weights rounded as stored): float32 round-off, not a weight that was lost."""


class ReloadMismatch(RuntimeError):
    """The saved checkpoint, loaded back, is not the pruned model."""


def check_reload(model: PreTrainedModel, directory: Path, task: TaskSpec, inputs: dict[str, torch.Tensor],
                 dtype: torch.dtype | None = None) -> str:
    """Load ``directory`` back (as a user would) and compare it with ``model``, which it was saved
    from with weights in ``dtype``: the same heads and neurons per layer, and outputs on ``inputs``
    (``(batch, seq)`` tensors on the model's device) within :data:`RELOAD_TOLERANCE` of ``model``'s
    with its weights rounded to ``dtype``. Returns a line for the report; raises
    :class:`ReloadMismatch` otherwise."""
    device = next(model.parameters()).device
    reloaded, _ = load_model(str(directory), task, device)
    saved, loaded = get_adapter(model).structure(), get_adapter(reloaded).structure()
    if loaded != saved:
        raise ReloadMismatch(f"the checkpoint in {directory} reloads with heads and neurons per layer {loaded}, "
                             f"not the pruned model's {saved}")
    stored = copy.deepcopy(model).to(dtype or torch.float32).float().eval()
    with torch.inference_mode():
        expected, found = stored(**inputs).to_tuple(), reloaded(**inputs).to_tuple()
    difference = max(float((a.float() - b.float()).abs().max()) for a, b in zip(expected, found))
    if not difference <= RELOAD_TOLERANCE:
        raise ReloadMismatch(f"the checkpoint in {directory} reloads with outputs up to {difference:.3g} away from "
                             f"the pruned model's (allowed: {RELOAD_TOLERANCE:g})")
    return (f"checkpoint reloaded and compared: same heads and neurons per layer, outputs within {difference:.1e} "
            f"of the pruned model's")
