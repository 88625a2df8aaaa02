"""The ``device`` setting of every command: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

torch is imported only once the name is known to be one of them, so that a mistyped device is
reported before the heavy imports.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from kprune_cli.runtime.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
CUDA_INDEX = re.compile(r"cuda:(\d+)")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` (the current GPU, normally
    GPU 0 of ``CUDA_VISIBLE_DEVICES``) or ``"cuda:N"`` (GPU N of those visible)."""
    index = CUDA_INDEX.fullmatch(name)
    if name not in DEVICES[:3] and index is None:
        raise UserError(f"unknown device {name!r}: choose one of {'|'.join(DEVICES)}")
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available: use device=cpu or device=auto")
    if index is not None and int(index.group(1)) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UserError(f"device {name!r}: this machine shows {count} GPU{'s' if count != 1 else ''} "
                        f"(cuda:0..cuda:{count - 1}): choose one of them or device=cuda")
    return torch.device(name)
