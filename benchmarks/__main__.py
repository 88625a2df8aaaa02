"""Benchmarks: K-prune's pruning cost (fast vs reference schedule), its scaling, and pruned models' speed.

    python -m benchmarks [--quick | --full] [--out bench.json] [--device cpu|cuda|auto]
                            [--threads N] [--sections pruning,scaling,inference,profile] [--in-process]
                            [--main-tokens N]

Prints tables and writes every figure to a JSON file. The default run takes about 10 minutes
on 2 CPU cores, ``--quick`` 1-2 minutes; ``--full`` uses the paper's sample sizes (hours on a CPU);
``--sections pruning --main-tokens 100000`` compares the schedules on MiniLM-MRPC with the
paper's sample (about an hour on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from benchmarks.suite import FULL, QUICK, Settings, busy_warning, run_suite
from benchmarks.tables import render
from kprune_cli.runtime.device import resolve_device
from kprune_cli.runtime.errors import UserError

SECTIONS = ("pruning", "scaling", "inference", "profile")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small samples and few repetitions (1-2 minutes)")
    size.add_argument("--full", action="store_true", help="the paper's sample sizes (25K-200K tokens)")
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON file of all figures")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: torch's)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--main-tokens", type=int, default=None,
                        help="calibration tokens of the main case's pruning-cost comparison (the paper's: 100000)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the prunings in this process (faster start, no separate peak memory)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        print(f"--sections: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device).type
    except UserError as error:
        print(f"--device: {error}", file=sys.stderr)
        return 2
    overrides = dict(QUICK if args.quick else FULL if args.full else {})
    if args.main_tokens is not None:
        if args.main_tokens < 1:
            print(f"--main-tokens {args.main_tokens}: must be a positive number of tokens", file=sys.stderr)
            return 2
        overrides["main_tokens"] = args.main_tokens
    settings = replace(Settings(), **overrides, device=device, threads=args.threads, isolate=not args.in_process)
    console = Console(width=max(Console().width, 132))  # wide tables stay readable in logs
    figures = run_suite(settings, sections, console)
    render(figures, console)
    warning = busy_warning(figures)
    if warning:
        console.print(f"[yellow]warning[/]: {warning}")
    args.out.write_text(json.dumps(figures, indent=2))
    console.print(f"figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
