"""kprune: retraining-free pruning of fine-tuned encoders (K-prune, ICLR 2024).

The Python API (docs/python-api.md) is importable from here: ``from kprune_cli import prune,
save_pruned``. It is loaded on first use, so that ``import kprune_cli`` (and ``kprune --help``)
stays light: no torch until then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kprune_cli.runtime.version import __version__

__all__ = ["PruneOutcome", "__version__", "prune", "save_pruned"]
API = ("PruneOutcome", "prune", "save_pruned")

if TYPE_CHECKING:
    from kprune_cli.core.api import PruneOutcome, prune, save_pruned


def __getattr__(name: str) -> Any:
    """The API's names, imported from :mod:`kprune_cli.core.api` when first asked for."""
    if name in API:
        from kprune_cli.core import api

        return getattr(api, name)
    raise AttributeError(f"module 'kprune_cli' has no attribute {name!r}")
