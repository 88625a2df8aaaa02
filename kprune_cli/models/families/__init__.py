"""The supported encoder families, one module each, found by ``model_type`` and imported only when
asked for, so that a family the installed transformers lacks (or has renamed) breaks only that family.

Each family module (``bert.py``, ``distilbert.py`` ...) holds the family's :class:`Layout` as
``LAYOUT`` and its pruned classes; ``kprune_common.py`` holds what they share. A pruned checkpoint
ships its family's module as ``modeling_kprune.py`` and ``kprune_common.py`` (:func:`modeling_files`),
nothing of the other families.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from transformers import PretrainedConfig

from kprune_cli.models.families.kprune_common import Layout

FAMILY_MODULES: dict[str, str] = {
    "bert": "bert",
    "roberta": "roberta",
    "electra": "electra",
    "xlm-roberta": "xlm_roberta",
    "mpnet": "mpnet",
    "deberta-v2": "deberta_v2",
    "modernbert": "modernbert",
    "distilbert": "distilbert",
}
"""The module of every supported family, by ``model_type``. MiniLM checkpoints are ``bert``,
DeBERTa-v3 ones ``deberta-v2``."""

SUPPORTED_FAMILIES = tuple(FAMILY_MODULES)
MODELING_FILE = "modeling_kprune.py"
"""The name a checkpoint gives its family's module (its ``auto_map`` entries say ``modeling_kprune.<class>``)."""
COMMON_FILE = "kprune_common.py"
"""The name of the shared module in the package and in a checkpoint (imported as ``.kprune_common``)."""


def family_module(model_type: str) -> ModuleType:
    """The module of the family ``model_type``: ``KeyError`` for an unsupported family, ``ImportError``
    when the installed transformers lacks it."""
    return importlib.import_module(f"{__name__}.{FAMILY_MODULES[model_type]}")


def layout_of(config: PretrainedConfig) -> Layout:
    """The layout of ``config``'s family (``KeyError`` for an unsupported one)."""
    return family_module(config.model_type).LAYOUT


def modeling_files(model_type: str) -> dict[str, Path]:
    """The files a pruned checkpoint of ``model_type`` ships, by their name in the checkpoint."""
    here = Path(__file__).resolve().parent
    return {MODELING_FILE: Path(family_module(model_type).__file__), COMMON_FILE: here / COMMON_FILE}
