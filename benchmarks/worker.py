"""One isolated pruning run: ``python -m benchmarks.worker CASE_DIR VARIANT OUT_DIR [DEVICE [THREADS]]``.

Loads the case saved in ``CASE_DIR``, prunes it with ``VARIANT`` (see
:data:`benchmarks.pruning.VARIANTS`) on ``DEVICE`` (default cpu) with ``THREADS`` CPU
threads (default: torch's) and writes the figures and decisions to ``OUT_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from benchmarks.cases import load_case
from benchmarks.pruning import run_variant, save_run


def main(argv: list[str]) -> None:
    case_dir, variant, out = Path(argv[0]), argv[1], Path(argv[2])
    device = argv[3] if len(argv) > 3 else "cpu"
    if len(argv) > 4:
        torch.set_num_threads(int(argv[4]))
    save_run(run_variant(load_case(case_dir), variant, device), out)


if __name__ == "__main__":
    main(sys.argv[1:])
