"""Where the Hydra configs live.

In a source checkout (and an editable install) they are ``configs/`` beside the package; a
wheel installs the same files as ``kprune_cli/configs`` (pyproject.toml maps one onto the
other), and that copy is preferred when present.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # kprune_cli/

CONFIG_DIR = next((path for path in (_PACKAGE / "configs", _PACKAGE.parent / "configs") if path.is_dir()),
                  _PACKAGE.parent / "configs")
"""The directory holding run.yaml, finetune.yaml ... and the config groups."""
