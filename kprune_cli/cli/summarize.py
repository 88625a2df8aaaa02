"""``kprune summarize DIR...``: one table (CSV, Markdown, JSON) and plots over many runs.

Runs are grouped by task, model, pruner, pruner variant and rate; each group is one row with
the mean ± std over its runs (seeds). A *variant* names the settings in which runs of the same
task, model and pruner differ other than rate and seed (e.g. ``pruner.lambda_rep=1e-05``), so
an ablation sweep never averages different settings together. Failed and incomplete runs are
listed in the Markdown and JSON outputs and on the console.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.markup import escape

from kprune_cli.core.report import flatten
from kprune_cli.runtime.console import console
from kprune_cli.runtime.errors import UserError
from kprune_cli.sweeps.collect import REPORT_NAME, FinishedRun, Runs, find_runs
from kprune_cli.sweeps.plots import layer_survivors_figure, metric_vs_flops_figure, pruner_label, save_png

SUMMARY_STEM = "summary"
# Config keys that differ between runs of one experiment: the swept rate and seed (and the
# settings that copy the seed), where the run wrote, how it ran.
NOT_VARIANT_KEYS = frozenset({
    "rate", "seed", "calibration.seed", "pruner.seed", "output_dir", "overwrite", "device", "data_dir",
    "eval_batch_size",
})
CSV_COLUMNS = (
    "task", "model", "pruner", "variant", "rate", "metric", "seeds", "metric_mean", "metric_std", "dense_metric",
    "flops_reduction_mean", "flops_reduction_std", "prune_seconds_mean", "prune_seconds_std",
)

Row = dict[str, Any]


def model_name(report: Mapping[str, Any]) -> str:
    """The model a run pruned: the last component of ``model.path``."""
    return Path(str(report["config"]["model"]["path"])).name


def summary_rows(finished: Sequence[FinishedRun]) -> list[Row]:
    """One row per (task, model, pruner, variant, rate): mean ± std over the group's runs."""
    variants = _variants(finished)
    groups: dict[tuple[str, str, str, str, float], list[FinishedRun]] = defaultdict(list)
    for run, variant in zip(finished, variants):
        report = run.report
        groups[(report["task"], model_name(report), report["pruner"], variant, float(report["rate"]))].append(run)
    return [_row(key, runs) for key, runs in sorted(groups.items())]


def _row(key: tuple[str, str, str, str, float], runs: list[FinishedRun]) -> Row:
    task, model, pruner, variant, rate = key
    reports = [run.report for run in runs]
    metric_mean, metric_std = _mean_std([r["metric"]["pruned"] for r in reports])
    flops_mean, flops_std = _mean_std([r["flops"]["reduction"] for r in reports])
    seconds_mean, seconds_std = _mean_std([r["timing"]["prune"] for r in reports])
    return {
        "task": task, "model": model, "pruner": pruner, "variant": variant, "rate": rate,
        "metric": reports[0]["metric"]["name"],
        "seeds": sorted(r["seed"] for r in reports),
        "metric_mean": metric_mean, "metric_std": metric_std,
        "dense_metric": statistics.fmean(r["metric"]["dense"] for r in reports),
        "flops_reduction_mean": flops_mean, "flops_reduction_std": flops_std,
        "prune_seconds_mean": seconds_mean, "prune_seconds_std": seconds_std,
        "runs": [str(run.path) for run in runs],
    }


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _variants(finished: Sequence[FinishedRun]) -> list[str]:
    """For each run, the settings (``key=value ...``) in which it differs from the other runs of
    its task, model and pruner; empty when they all agree."""
    flat = [flatten(run.report["config"]) for run in finished]
    families: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for index, run in enumerate(finished):
        families[(run.report["task"], model_name(run.report), run.report["pruner"])].append(index)
    variants = [""] * len(finished)
    for members in families.values():
        keys = sorted({key for i in members for key in flat[i]} - NOT_VARIANT_KEYS)
        varying = [key for key in keys if len({repr(flat[i].get(key)) for i in members}) > 1]
        for i in members:
            variants[i] = " ".join(f"{key}={flat[i].get(key)}" for key in varying)
    return variants


def render_markdown(rows: Sequence[Row], runs: Runs) -> str:
    """The summary table (metric and FLOPs reduction ×100, mean ± std), then failed and incomplete runs."""
    lines = [
        "# kprune summary",
        "",
        "| task | model | pruner | rate | seeds | metric | dense | pruned | FLOPs reduction (%) | prune time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['task']} | {row['model']} | {pruner_label(row)} | {row['rate']:g} | {len(row['seeds'])} "
            f"| {row['metric']} | {100 * row['dense_metric']:.2f} "
            f"| {_pm(row['metric_mean'], row['metric_std'], 100, 2)} "
            f"| {_pm(row['flops_reduction_mean'], row['flops_reduction_std'], 100, 1)} "
            f"| {_pm(row['prune_seconds_mean'], row['prune_seconds_std'], 1, 1)} |"
        )
    if runs.failed:
        lines += ["", "## Failed runs", "", *[f"- `{run.path}`: {run.error}" for run in runs.failed]]
    if runs.incomplete:
        lines += ["", "## Incomplete runs (no report.json)", "", *[f"- `{path}`" for path in runs.incomplete]]
    return "\n".join(lines) + "\n"


def _pm(mean: float, std: float | None, scale: float, digits: int) -> str:
    text = f"{scale * mean:.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:.{digits}f}"


def write_summary(runs: Runs, output: Path, layer_runs: Sequence[Path] = ()) -> list[Path]:
    """Write summary.{csv,md,json}, one metric-vs-FLOPs plot per task and model, and a layer
    heatmap for each of ``layer_runs``; return the paths written."""
    if not runs.finished:
        raise UserError("no finished run (report.json) found: nothing to summarize"
                        + (f"; {len(runs.failed)} failed, {len(runs.incomplete)} incomplete" if
                           runs.failed or runs.incomplete else ""))
    output.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(runs.finished)
    written = [output / f"{SUMMARY_STEM}.{suffix}" for suffix in ("csv", "md", "json")]
    _write_csv(rows, written[0])
    written[1].write_text(render_markdown(rows, runs))
    written[2].write_text(json.dumps({
        "rows": rows,
        "failed": [{"path": str(run.path), "error": run.error} for run in runs.failed],
        "incomplete": [str(path) for path in runs.incomplete],
    }, indent=2) + "\n")
    by_plot: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        by_plot[(row["task"], row["model"])].append(row)
    for (task, model), plot_rows in by_plot.items():
        written.append(save_png(metric_vs_flops_figure(plot_rows), output / f"plot-{file_slug(task)}-{file_slug(model)}.png"))
    for run_dir in layer_runs:
        report = _read_report(run_dir)
        written.append(save_png(layer_survivors_figure(report), output / f"layers-{file_slug(run_dir.name)}.png"))
    return written


def _write_csv(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "seeds": " ".join(str(seed) for seed in row["seeds"])})


def _read_report(run_dir: Path) -> dict[str, Any]:
    path = run_dir / REPORT_NAME
    if not path.is_file():
        raise UserError(f"--layers {run_dir}: no {REPORT_NAME} there; give the directory of a finished run")
    return json.loads(path.read_text())


def file_slug(text: str) -> str:
    """``text`` as a file-name part: letters, digits, ``.``, ``_`` and ``-`` only."""
    return re.sub(r"[^\w.-]+", "_", text)


def print_outcome(runs: Runs, written: Sequence[Path]) -> None:
    """The Markdown table on stdout; failed and incomplete runs and the files written on the console."""
    print(next(path for path in written if path.suffix == ".md").read_text(), end="")
    console.print(f"{len(runs.finished)} finished, {len(runs.failed)} failed, {len(runs.incomplete)} incomplete runs",
                  highlight=False)
    for run in runs.failed:
        console.print(f"[bold red]failed:[/] {escape(f'{run.path}: {run.error}')}", highlight=False, soft_wrap=True)
    for path in runs.incomplete:
        console.print(f"[yellow]incomplete:[/] {escape(str(path))} (no report.json)", highlight=False, soft_wrap=True)
    for path in written:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)


def summarize_command(args: Sequence[str]) -> None:
    """``kprune summarize DIR [DIR ...] [-o OUT] [--layers RUN]...``."""
    parser = argparse.ArgumentParser(
        prog="kprune summarize",
        description="Summarize the runs (report.json) under directories: summary.csv/.md/.json with mean ± std over "
                    "seeds, a metric-vs-FLOPs plot per task and model, optional per-layer heatmaps. Failed and "
                    "incomplete runs are listed.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run, sweep or output directories")
    parser.add_argument("-o", "--output", type=Path, help="where to write (default: the first DIR)")
    parser.add_argument("--layers", action="append", type=Path, metavar="RUN",
                        help="a run directory to draw a surviving heads/neurons heatmap for (repeatable)")
    options = parser.parse_args(list(args))
    runs = find_runs(options.dirs)
    written = write_summary(runs, options.output or options.dirs[0], options.layers or ())
    print_outcome(runs, written)
