"""The benchmark figures (:func:`~benchmarks.suite.run_suite`) as rich tables."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from benchmarks.inference import SPEEDUP_TARGET


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def pruning_table(result: dict) -> Table:
    """One row per variant of one case, ratios against the first (the reference)."""
    case = result["case"]
    table = Table(title=f"Pruning cost: {case['name']} ({case['layers']} layers, d={case['hidden']}, "
                        f"{case['tokens']} tokens, rate {case['rate']}, {result['device']})")
    for column in ("variant", "wall s", "CPU s", "measure/tune/teacher s", "peak MB", "speedup wall/CPU",
                   "memory ratio", "same masks", "agreement", "max |ΔW|"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in result["runs"]:
        stages = row["stages"]
        compared = "speedup" in row
        table.add_row(
            row["variant"], f"{row['wall_s']:.1f}", f"{row['cpu_s']:.1f}",
            f"{stages['measure']:.1f}/{stages['tune']:.1f}/{stages['teacher']:.1f}", _mb(row["peak_mb"]),
            f"{_ratio(row['speedup'])}/{_ratio(row['cpu_speedup'])}" if compared else "-",
            _ratio(row.get("memory_ratio")), str(row["masks_equal"]) if compared else "-",
            f"{row['keep_agreement']:.3f}" if compared else "-",
            f"{row['max_weight_diff']:.1e}" if compared else "-",
        )
    return table


def scaling_tables(scaling: dict) -> list[Table]:
    """Time against tokens and against depth, with the fitted exponents in the titles."""
    tokens = Table(title=f"Scaling with the sample: time ∝ tokens^{scaling['tokens_exponent']:.2f} (wall), "
                         f"^{scaling['tokens_exponent_cpu']:.2f} (CPU); CPU time ∝ padded positions"
                         f"^{scaling['positions_exponent_cpu']:.2f}" if scaling["tokens_exponent"] is not None
                   else "Scaling with the sample")
    for column in ("tokens", "positions", "wall s", "CPU s", "CPU ms / position", "peak MB"):
        tokens.add_column(column, justify="right")
    for row in scaling["tokens"]:
        tokens.add_row(str(row["tokens"]), str(row["positions"]), f"{row['wall_s']:.1f}", f"{row['cpu_s']:.1f}",
                       f"{1000 * row['cpu_s'] / row['positions']:.2f}", _mb(row["peak_mb"]))
    depth = Table(title=f"Scaling with depth: time ∝ layers^{scaling['depth_exponent']:.2f}"
                  if scaling["depth_exponent"] is not None else "Scaling with depth")
    for column in ("layers", "wall s", "CPU s", "peak MB"):
        depth.add_column(column, justify="right")
    for row in scaling["depth"]:
        depth.add_row(str(row["layers"]), f"{row['wall_s']:.1f}", f"{row['cpu_s']:.1f}", _mb(row["peak_mb"]))
    return [tokens, depth]


def inference_table(rows: list[dict]) -> Table:
    """Latency per rate, batch size and dtype, with the speedup next to the FLOPs ratio."""
    table = Table(title=f"Inference (target: speedup ≥ {SPEEDUP_TARGET} × FLOPs ratio at the largest batch on CPU)")
    for column in ("rate", "dtype", "batch", "median ms", "IQR ms", "seq/s", "FLOPs ratio", "speedup", "target"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(f"{row['rate']:.1f}", row["dtype"], str(row["batch_size"]), f"{row['median_ms']:.2f}",
                      f"{row['iqr_ms']:.2f}", f"{row['sequences_per_s']:.0f}", _ratio(row["flops_ratio"]),
                      _ratio(row["speedup"]), "-" if row["rate"] == 0 else ("met" if row["target_met"] else "missed"))
    return table


def profile_table(figures: dict) -> Table:
    """Self time by operator group, with the matmul throughput against plain matmuls in the caption."""
    case = figures["case"]
    reached = figures["matmul_gflops_s"]
    plain = ", ".join(f"{dtype} {value:.0f}" for dtype, value in figures["plain_matmul_gflops_s"].items())
    m, k, n = figures["plain_matmul_shape"]
    table = Table(title=f"Profile of the fast schedule: {case['name']}, {case['tokens']} tokens, "
                        f"{figures['self_s']:.1f} s of {figures['clock']} self time",
                  caption=f"matmuls: {figures['matmul_tflop']:.2f} TFLOP at "
                          f"{'-' if reached is None else f'{reached:.0f}'} GFLOP/s; a plain "
                          f"({m}x{k})@({k}x{n}): {plain} GFLOP/s", min_width=100)
    for column in ("operator group", "self s", "share"):
        table.add_column(column, justify="left" if column == "operator group" else "right")
    for name, group in figures["groups"].items():
        table.add_row(name, f"{group['s']:.1f}", f"{100 * group['share']:.1f}%")
    return table


def render(figures: dict, console: Console) -> None:
    """Print every section present in ``figures``."""
    for result in figures.get("pruning", []):
        console.print(pruning_table(result))
    if "scaling" in figures:
        for table in scaling_tables(figures["scaling"]):
            console.print(table)
    if "inference" in figures:
        console.print(inference_table(figures["inference"]))
    if "profile" in figures:
        console.print(profile_table(figures["profile"]))
