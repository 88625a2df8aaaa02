"""Figures of runs: metric vs FLOPs reduction per pruner, and surviving units per layer.

Figures are built with the object API (``matplotlib.figure.Figure``: no pyplot state, no
display) and saved as PNG through the Agg renderer.
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from kprune_cli.core.report import Report
from kprune_cli.runtime.errors import UserError

TOLERANCE_POINTS = 3.0  # the paper's reference line: dense metric minus 3 points
LAYER_KINDS = ("heads", "neurons")


def pruner_label(row: Mapping[str, Any]) -> str:
    """``kprune`` or, for a variant of a pruner's settings, ``kprune (pruner.mu=32.0)``."""
    return f"{row['pruner']} ({row['variant']})" if row["variant"] else str(row["pruner"])


def metric_vs_flops_figure(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Metric (×100) vs achieved FLOPs reduction (%) for the rows of one task and model.

    One line per pruner through its rates (mean over seeds, error bars: std over seeds), the
    dense model's metric as a solid horizontal line and dense − 3 points as a dashed one.
    ``rows`` are summary rows (see :func:`kprune_cli.cli.summarize.summary_rows`).
    """
    first = rows[0]
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.add_subplot()
    ordered = sorted(rows, key=lambda row: (pruner_label(row), row["rate"]))
    for label, group in groupby(ordered, key=pruner_label):
        points = list(group)
        x = [100 * row["flops_reduction_mean"] for row in points]
        y = [100 * row["metric_mean"] for row in points]
        (line,) = axes.plot(x, y, marker="o", label=label)
        if any(row["metric_std"] is not None for row in points):
            error = [100 * (row["metric_std"] or 0.0) for row in points]
            axes.errorbar(x, y, yerr=error, fmt="none", ecolor=line.get_color(), capsize=3)
    dense = 100 * float(np.mean([row["dense_metric"] for row in rows]))
    axes.axhline(dense, color="black", linewidth=1, label=f"dense ({dense:.2f})")
    axes.axhline(dense - TOLERANCE_POINTS, color="black", linewidth=1, linestyle="--",
                 label=f"dense − {TOLERANCE_POINTS:g} points")
    reductions = [100 * row["flops_reduction_mean"] for row in rows]
    axes.set_xlim(max(0.0, min(reductions) - 5.0), min(100.0, max(reductions) + 5.0))
    axes.ticklabel_format(axis="x", useOffset=False)
    axes.set_xlabel("FLOPs reduction (%)")
    axes.set_ylabel(f"{first['metric']} (×100)")
    axes.set_title(f"{first['task']} · {first['model']}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def layer_survivors_figure(report: Report) -> Figure:
    """Heatmap of one run's surviving heads and neurons per layer.

    Colour: the fraction of the layer's dense units kept; each cell is labelled with the count.
    """
    if "dense_layers" not in report:
        raise UserError(f"the report of {report['checkpoint']['path']} has no dense_layers "
                        f"(written by an older kprune): re-run it to plot its layers")
    kept = np.array([[layer[kind] for layer in report["layers"]] for kind in LAYER_KINDS])  # (2, layers)
    dense = np.array([[layer[kind] for layer in report["dense_layers"]] for kind in LAYER_KINDS])  # (2, layers)
    fraction = kept / np.maximum(dense, 1)
    num_layers = kept.shape[1]
    figure = Figure(figsize=(max(4.0, 0.7 * num_layers + 2.0), 2.6), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(fraction, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for (row, column), count in np.ndenumerate(kept):
        color = "black" if fraction[row, column] > 0.6 else "white"
        axes.text(column, row, str(count), ha="center", va="center", color=color, fontsize="small")
    axes.set_xticks(range(num_layers))
    axes.set_yticks(range(len(LAYER_KINDS)), LAYER_KINDS)
    axes.set_xlabel("layer")
    axes.set_title(f"{report['task']} · {report['pruner']} · rate {report['rate']} · seed {report['seed']} "
                   f"(FLOPs −{100 * report['flops']['reduction']:.1f}%)", fontsize="medium")
    figure.colorbar(image, ax=axes, label="fraction kept")
    return figure


def save_png(figure: Figure, path: Path) -> Path:
    """Write ``figure`` as a PNG (Agg renderer) and return ``path``."""
    figure.savefig(path, format="png", dpi=150)
    return path
