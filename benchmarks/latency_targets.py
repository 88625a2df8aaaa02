"""The latency targets of docs/latency.md: prune to 2x, 3x and 4x measured speedups and check them.

    python -m benchmarks.latency_targets --model DIR --data DIR [--task mrpc] [--out runs/latency]
        [--batch-sizes 1,32] [--speedups 2,3,4] [--pruners kprune,kwon] [--flops] [--num-tokens 100000]
        [--runtime onnxruntime|torch] [--quantize int8 [--baseline float32]] [--seeds 0,1,2]
    python -m benchmarks.latency_targets --render runs/latency/latency_targets.json

For each batch size, speedup, pruner and seed: ``kprune run constraint=latency`` on ``--runtime`` (ONNX
Runtime by default; CPU, 2 threads), whose report.json holds the measured speedup, its 95% interval
and the table's prediction. ``--quantize int8`` times int8 models (``latency.quantize``), and with
``--baseline float32`` the speedups are targets over the dense float32 model (``latency.baseline``).
With ``--flops``, K-prune at the FLOPs rate of the same number (``rate = 1 - 1/speedup``), timed by
``kprune bench`` on the same runtime, for the comparison at equal measured speed. Prints
one Markdown table and writes ``latency_targets.json`` in ``--out``. Run it on a quiet machine: the
timings are the result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

KPRUNE = [sys.executable, "-m", "kprune_cli"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    print("+ kprune " + " ".join(args), flush=True)
    return subprocess.run([*KPRUNE, *args], check=False, capture_output=True, text=True)


def latency_run(options: argparse.Namespace, pruner: str, batch_size: int, speedup: float, seed: int) -> dict:
    """One ``constraint=latency`` run; its report's figures, or the one-line refusal."""
    rate = round(1.0 - 1.0 / speedup, 6)
    runtime = options.runtime + (f"-{options.quantize}" if options.quantize else "") \
        + (f"-over-{options.baseline}" if options.baseline else "")
    output = Path(options.out) / f"{options.task}-{pruner}-latency-{runtime}-b{batch_size}-x{speedup:g}-s{seed}"
    sample = [] if pruner == "kwon" else [f"calibration.num_tokens={options.num_tokens}"]
    quantized = [f"latency.quantize={options.quantize}"] if options.quantize else []
    quantized += [f"latency.baseline={options.baseline}"] if options.baseline else []
    done = run(["run", f"task={options.task}", f"model.path={options.model}", f"data_dir={options.data}",
                f"pruner={pruner}", f"rate={rate}", f"seed={seed}", "constraint=latency",
                f"latency.runtime={options.runtime}", *quantized, "latency.threads=2",
                f"latency.batch_size={batch_size}", f"output_dir={output}", "overwrite=true", *sample])
    row = {"pruner": pruner, "constraint": "latency", "runtime": runtime, "batch_size": batch_size,
           "target": speedup, "rate": rate, "seed": seed}
    if done.returncode != 0:
        return row | {"error": done.stderr.strip().splitlines()[-1]}
    report = json.loads((output / "report.json").read_text())
    return row | {"metric": report["metric"]["pruned"], "dense_metric": report["metric"]["dense"],
                  "metric_int8": report["metric"].get("pruned_int8"),
                  "flops_kept": report["flops"]["pruned"] / report["flops"]["dense"], **report["latency"]}


def flops_run(options: argparse.Namespace, batch_size: int, speedup: float) -> dict:
    """K-prune at the FLOPs rate ``1 - 1/speedup``, timed by ``kprune bench`` on ONNX Runtime."""
    rate = round(1.0 - 1.0 / speedup, 6)
    output = Path(options.out) / f"{options.task}-kprune-flops-x{speedup:g}"
    if not (output / "report.json").is_file():
        done = run(["run", f"task={options.task}", f"model.path={options.model}", f"data_dir={options.data}",
                    f"rate={rate}", f"output_dir={output}", "overwrite=true",
                    f"calibration.num_tokens={options.num_tokens}"])
        if done.returncode != 0:
            return {"pruner": "kprune", "constraint": "flops", "error": done.stderr.strip().splitlines()[-1]}
    report = json.loads((output / "report.json").read_text())
    bench = run(["bench", f"checkpoint={output / 'pruned'}", f"dense={options.model}", f"task={options.task}",
                 f"batch_sizes=[{batch_size}]", "repeats=30", "onnx=true"])
    figures = json.loads(bench.stdout.strip().splitlines()[-1])["rows"][0]
    return {"pruner": "kprune", "constraint": "flops", "batch_size": batch_size, "target": speedup, "rate": rate,
            "metric": report["metric"]["pruned"], "dense_metric": report["metric"]["dense"],
            "flops_kept": report["flops"]["pruned"] / report["flops"]["dense"],
            "speedup": figures["onnxruntime_speedup"]}


def markdown(rows: list[dict]) -> str:
    header = ("| pruner | constraint | batch | target | accuracy | measured speedup (95% CI) | predicted speedup | "
              "pruned ms: predicted / measured | met |")
    lines = [header, "|---|---|---:|---:|---:|---|---:|---|---|"]
    for row in rows:
        start = f"| {row['pruner']} | {row['constraint']} | {row.get('batch_size', '')} | {row.get('target', 0):g}x |"
        if "error" in row:
            lines.append(f"{start} | refused: {row['error']} | | | |")
        elif "met" in row:
            low, high = row["speedup_ci"]
            metric = f"{100 * row['metric']:.2f}" + (f" (int8 {100 * row['metric_int8']:.2f})"
                                                    if row.get("metric_int8") is not None else "")
            over = ""
            if "speedup_over_float32" in row:
                float_low, float_high = row["speedup_over_float32_ci"]
                over = f"; over float32 {row['speedup_over_float32']:.2f}x ({float_low:.2f}-{float_high:.2f})"
                if "baseline" in row:
                    over += f", {'met' if row['baseline']['met'] else 'missed'}"
            lines.append(f"{start} {metric} | {row['speedup']:.2f}x ({low:.2f}-{high:.2f}){over} | "
                         f"{row['predicted_speedup']:.2f}x | {row['predicted_ms']:.1f} / {row['pruned_ms']:.1f} | "
                         f"{'yes' if row['met'] else 'no'} |")
        else:
            lines.append(f"{start} {100 * row['metric']:.2f} | {row['speedup']:.2f}x (kprune bench) | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--task", default="mrpc")
    parser.add_argument("--out", default="runs/latency")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--speedups", default="2,3,4")
    parser.add_argument("--pruners", default="kprune,kwon")
    parser.add_argument("--flops", action="store_true")
    parser.add_argument("--num-tokens", type=int, default=100_000)
    parser.add_argument("--runtime", choices=("onnxruntime", "torch"), default="onnxruntime")
    parser.add_argument("--quantize", choices=("int8",))
    parser.add_argument("--baseline", choices=("float32",))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--render", help="only print the table of a latency_targets.json written before")
    options = parser.parse_args()
    if options.render:
        print(markdown(json.loads(Path(options.render).read_text())))
        return
    if not (options.model and options.data):
        parser.error("give --model and --data (or --render FILE)")
    rows = []
    for batch_size in (int(size) for size in options.batch_sizes.split(",")):
        for speedup in (float(value) for value in options.speedups.split(",")):
            for pruner in options.pruners.split(","):
                for seed in (int(value) for value in options.seeds.split(",")):
                    rows.append(latency_run(options, pruner, batch_size, speedup, seed))
                    print(markdown(rows[-1:]), flush=True)
            if options.flops:
                rows.append(flops_run(options, batch_size, speedup))
                print(markdown(rows[-1:]), flush=True)
    Path(options.out).mkdir(parents=True, exist_ok=True)
    (Path(options.out) / "latency_targets.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
