"""The ``device`` setting of every command: ``auto``, ``cpu`` or ``cuda``.

torch is imported only once the name is known to be one of them, so that a mistyped device is
reported before the heavy imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kprune_cli.runtime.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"`` or ``"cuda"``."""
    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}: choose one of {'|'.join(DEVICES)}")
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available: use device=cpu or device=auto")
    return torch.device(name)
