"""The run report: ``report.json`` (stable schema), ``report.md`` and the console summary.

Schema of ``report.json`` (``schema_version`` 1; metric values are fractions, 0.873)::

    {"schema_version": 1, "task", "pruner", "rate", "seed", "device",
     "config": {...}, "config_hash", "versions": {...},
     "metric": {"name", "dense", "pruned", "all": {"dense": {...}, "pruned": {...}}},
                                                             # latency.quantize=int8 adds "pruned_int8" to
                                                             # both: the pruned model in ONNX Runtime int8
     "flops": {"dense", "pruned", "reduction", "seq_len"},   # reduction = 1 - pruned / dense
     "params": {"dense", "pruned"}, "checkpoint": {"path", "bytes"},
     "layers": [{"heads", "neurons"}, ...],                   # survivors per layer
     "dense_layers": [{"heads", "neurons"}, ...],             # units per layer before pruning
     "sample": {"examples", "windows", "tokens", "asked"},     # drawn train rows (SQuAD: questions), model
                                                             # input sequences (SQuAD: windows), real tokens;
                                                             # asked: the size setting, "calibration.num_tokens=100000"
     "pruner_settings": {...},                                # what the pruner ran with, those it chose for
                                                             # the task included ({"gradient_batch": 12})
     "timing": {"<stage>": seconds, ...}, "peak_memory_mb", "notes": [...],
     "numerics": {"deterministic", "matmul_precision"},        # deterministic=true; float32 products outside
                                                             # the pruners' full-float32 passes
     "smoke": false,                                          # true: a smoke run, its metric no result
     "latency": {...}}                                        # constraint=latency only: the measured speedup
                                                             # (kprune_cli/core/latency_budget.py, docs/latency.md)
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from rich.markup import escape
from rich.table import Table

from kprune_cli.models.flops import FlopsModel
from kprune_cli.models.model_card import ModelCard
from kprune_cli.runtime.console import console
from kprune_cli.runtime.output_dir import write_json_atomic
from kprune_cli.runtime.precision import matmul_precision
from kprune_cli.tasks.calibration import CalibrationSample
from kprune_cli.tasks.kinds import kind_of
from kprune_cli.tasks.spec import TaskSpec

SCHEMA_VERSION = 1
Report = dict[str, Any]
SMOKE_NOTE = ("smoke run (smoke=true, e.g. preset=smoke): a check that the model prunes, saves and reloads; "
              "its metrics come from a small sample and evaluation and are not a result")


def versions(device: torch.device | None = None) -> dict[str, str]:
    """Versions of the interpreter and the libraries that decide the results; on a CUDA ``device``
    also the CUDA and cuDNN versions torch was built with and the GPU model."""
    import datasets
    import transformers

    from kprune_cli.runtime.version import __version__

    return {
        "kprune": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        **(cuda_versions(device) if device is not None and device.type == "cuda" else {}),
    }


def cuda_versions(device: torch.device) -> dict[str, str]:
    """``{"cuda", "cudnn", "gpu"}`` of a CUDA ``device``."""
    return {"cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version()),
            "gpu": torch.cuda.get_device_name(device)}


# Where a job writes, and whether it resumed, say nothing about the experiment: left out of the hash.
UNHASHED_KEYS = ("output_dir", "overwrite", "resume")


def experiment_values(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the keys of :data:`UNHASHED_KEYS`."""
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in UNHASHED_KEYS}


def config_hash(cfg: DictConfig) -> str:
    """A short hash of the resolved config without where it is written (the same experiment
    gives the same hash in any directory)."""
    text = OmegaConf.to_yaml(OmegaConf.create(experiment_values(cfg)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys: ``{"pruner": {"mu": 64.0}}`` gives ``{"pruner.mu": 64.0}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_identity(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """What a resumed run must share with the saved one (:class:`~kprune_cli.runtime.steps.StepCheckpoints`):
    the config (hash and flattened values, without where the run writes or whether it resumes), the
    device type and, on CUDA, the GPU model (another model's kernels give other round-off)."""
    gpu = {"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}
    return {"config_hash": config_hash(cfg), "config": flatten(experiment_values(cfg)), "device": device.type, **gpu}


def pruning_figures(flops: FlopsModel, dense_structure: Sequence[Mapping[str, int]],
                    pruned_structure: Sequence[Mapping[str, int]], params: tuple[int, int],
                    sample: CalibrationSample, sample_size: str) -> dict[str, Any]:
    """What pruning removed and from what sample: the report's ``flops``, ``params``, ``layers``,
    ``dense_layers`` and ``sample`` blocks (``kprune run``'s report and the Python API's)."""
    dense_flops, pruned_flops = flops.total(dense_structure), flops.total(pruned_structure)
    return {
        "flops": {
            "dense": dense_flops,
            "pruned": pruned_flops,
            "reduction": 1.0 - pruned_flops / dense_flops,
            "seq_len": flops.seq_len,
        },
        "params": {"dense": params[0], "pruned": params[1]},
        "layers": [dict(layer) for layer in pruned_structure],
        "dense_layers": [dict(layer) for layer in dense_structure],
        "sample": {"examples": sample.num_examples, "windows": sample.num_sequences, "tokens": sample.num_tokens,
                   "asked": sample_size},
    }


def build_report(*, cfg: DictConfig, task: TaskSpec, pruner: str, rate: float, device: torch.device,
                 dense_metrics: Mapping[str, float], pruned_metrics: Mapping[str, float], flops: FlopsModel,
                 dense_structure: Sequence[Mapping[str, int]], pruned_structure: Sequence[Mapping[str, int]],
                 params: tuple[int, int], checkpoint: tuple[Path, int], sample: CalibrationSample,
                 sample_size: str, pruner_settings: Mapping[str, Any], timing: Mapping[str, float],
                 notes: Sequence[str], peak_memory: float,
                 smoke: bool = False, deterministic: bool = False, latency: Mapping[str, Any] | None = None,
                 int8_metrics: Mapping[str, float] | None = None) -> Report:
    """Assemble the report dictionary (see the module docstring for its schema); ``latency``: the
    measured speedup of a ``constraint=latency`` run
    (:func:`~kprune_cli.core.latency_budget.verify_speedup`); ``int8_metrics``: the pruned model's
    metrics in ONNX Runtime int8 (``latency.quantize=int8``)."""
    report = {
        "schema_version": SCHEMA_VERSION,
        "task": task.name,
        "pruner": pruner,
        "rate": rate,
        "seed": int(cfg.seed),
        "device": str(device),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_hash": config_hash(cfg),
        "versions": versions(device),
        "metric": {
            "name": task.metric,
            "dense": dense_metrics[task.metric],
            "pruned": pruned_metrics[task.metric],
            "all": {"dense": dict(dense_metrics), "pruned": dict(pruned_metrics)},
        },
        **pruning_figures(flops, dense_structure, pruned_structure, params, sample, sample_size),
        "checkpoint": {"path": str(checkpoint[0]), "bytes": checkpoint[1]},
        "pruner_settings": dict(pruner_settings),
        "timing": {name: round(seconds, 3) for name, seconds in timing.items()},
        "peak_memory_mb": round(peak_memory, 1),
        "notes": list(notes),
        "numerics": {"deterministic": deterministic, "matmul_precision": matmul_precision()},
        "smoke": smoke,
    }
    if latency is not None:
        report["latency"] = dict(latency)
    if int8_metrics is not None:
        report["metric"]["pruned_int8"] = int8_metrics[task.metric]
        report["metric"]["all"]["pruned_int8"] = dict(int8_metrics)
    return report


def render_markdown(report: Report) -> str:
    """``report.md``: the same facts as report.json, for people."""
    metric, flops, params = report["metric"], report["flops"], report["params"]
    pruner_settings = "".join(f"Pruner {key}: {value}. " for key, value in report["pruner_settings"].items())
    lines = [
        f"# kprune report: {report['task']}, {report['pruner']}, rate {report['rate']}",
        "",
        *(["**Smoke run: the metrics below are a quick check, not a result.**", ""] if report.get("smoke") else []),
        "| | dense | pruned |",
        "|---|---|---|",
        f"| {metric['name']} | {metric['dense']:.4f} | {metric['pruned']:.4f} |",
    ]
    if "pruned_int8" in metric:
        lines.append(f"| {metric['name']}, ONNX Runtime int8 | | {metric['pruned_int8']:.4f} |")
    for name in metric["all"]["dense"]:
        if name != metric["name"]:
            lines.append(f"| {name} | {metric['all']['dense'][name]:.4f} | {metric['all']['pruned'][name]:.4f} |")
    lines += [
        f"| FLOPs (S={flops['seq_len']:.2f}) | {flops['dense']:.4g} | {flops['pruned']:.4g} |",
        f"| parameters | {params['dense']:,} | {params['pruned']:,} |",
        "",
        f"FLOPs reduction: {flops['reduction']:.4f} (target {report['rate']}). "
        f"Checkpoint: `{report['checkpoint']['path']}` ({report['checkpoint']['bytes'] / 2**20:.1f} MiB). "
        f"Calibration sample: {_sample_line(report['sample'])}. {pruner_settings}"
        f"Seed {report['seed']}, device {report['device']}, peak memory {report['peak_memory_mb']:.0f} MB."
        + _numerics_line(report.get("numerics")),
        "",
        *_latency_lines(report.get("latency")),
        "## Surviving units per layer",
        "",
        "| layer | heads | neurons |",
        "|---|---|---|",
        *[f"| {i} | {layer['heads']} | {layer['neurons']} |" for i, layer in enumerate(report["layers"])],
        "",
        "## Time per stage (s)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {seconds:.2f} |" for name, seconds in report["timing"].items()],
    ]
    if report["notes"]:
        lines += ["", "## Notes", "", *[f"- {note}" for note in report["notes"]]]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def _latency_lines(latency: Mapping[str, Any] | None) -> list[str]:
    """The measured speedup of a ``constraint=latency`` run, with its target, as report.md lines."""
    if latency is None:
        return []
    low, high = latency["speedup_ci"]
    verdict = "met" if latency["met"] else "**missed**"
    return [
        "## Measured latency", "",
        f"{runtime_name(latency)} on {latency['device']}, {latency['threads']} threads, "
        f"batch {latency['batch_size']} x {latency['seq_len']} tokens, {latency['repeats']} rounds in turns: "
        f"dense {latency['dense_ms']:.2f} ms, "
        f"pruned {latency['pruned_ms']:.2f} ms (predicted {latency['predicted_ms']:.2f} ms). Speedup "
        f"{latency['speedup']:.2f}x (95% interval {low:.2f}-{high:.2f}); target {latency['target_speedup']:.2f}x: "
        f"{verdict}.", "",
        *_float32_lines(latency),
        *_replan_lines(latency.get("replan")),
    ]


def runtime_name(latency: Mapping[str, Any]) -> str:
    """``torch``, ``onnxruntime`` or ``onnxruntime int8``, from a report's ``latency`` block."""
    return " ".join(part for part in (latency["runtime"], latency.get("quantize")) if part)


def _float32_lines(latency: Mapping[str, Any]) -> list[str]:
    """On a quantized runtime, the pruned model's speedup over the dense float32 model, as report.md lines."""
    if latency.get("quantize") is None:
        return []
    low, high = latency["speedup_over_float32_ci"]
    target = ""
    if (baseline := latency.get("baseline")) is not None:
        target = (f" Target over float32 (latency.baseline=float32, rate {baseline['rate']}): "
                  f"{baseline['target_speedup']:.2f}x: {'met' if baseline['met'] else '**missed**'}.")
    return [f"The dense float32 model, timed in the same turns: {latency['dense_float32_ms']:.2f} ms; the pruned "
            f"{latency['quantize']} model runs {latency['speedup_over_float32']:.2f}x faster (95% interval "
            f"{low:.2f}-{high:.2f}).{target}", ""]


def _replan_lines(replan: Mapping[str, Any] | None) -> list[str]:
    """The first plan of a re-planned latency run, as report.md lines."""
    if replan is None:
        return []
    return [f"Re-planned: the first plan ran {replan['first_speedup']:.2f}x (predicted "
            f"{replan['first_predicted_speedup']:.2f}x); the second, above, was planned for "
            f"{replan['planned_speedup']:.2f}x (rate {replan['planned_rate']:.4f}).", ""]


def _numerics_line(numerics: Mapping[str, Any] | None) -> str:
    """`` Deterministic algorithms: on. float32 matmul precision outside the pruning passes: highest.``"""
    if numerics is None:
        return ""
    return (f" Deterministic algorithms: {'on' if numerics['deterministic'] else 'off'}. float32 matmul precision "
            f"outside the pruning passes: {numerics['matmul_precision']}.")


def _sample_line(sample: Mapping[str, Any]) -> str:
    """``2048 examples (2103 windows), 331,620 tokens (calibration.num_examples=2048)``."""
    windows = f" ({sample['windows']} windows)" if sample["windows"] != sample["examples"] else ""
    return f"{sample['examples']} examples{windows}, {sample['tokens']:,} tokens ({sample['asked']})"


def write_reports(report: Report, directory: Path) -> None:
    """Write report.md, then report.json (atomically, last: its presence marks success)."""
    (directory / "report.md").write_text(render_markdown(report))
    write_json_atomic(directory / "report.json", report)


def model_card(report: Report, task: TaskSpec, source: str, command: str | None) -> ModelCard:
    """The model card of the run's ``pruned/``, from its report; ``source``: the dense model pruned
    (a directory or a hub id), ``command``: the command that ran it."""
    capped = report["config"].get("eval_max_examples")
    return ModelCard(
        task=report["task"], pipeline_tag=kind_of(task).pipeline_tag, auto_class=kind_of(task).auto_class.__name__,
        source=source, base_model=_hub_id(source),
        pruner=report["pruner"], rate=report["rate"], metric=report["metric"]["name"],
        dense=report["metric"]["dense"], pruned=report["metric"]["pruned"],
        evaluated_on=f"{task.eval_splits[0]} split" + (f", first {capped} examples" if capped else ""),
        flops_kept=report["flops"]["pruned"] / report["flops"]["dense"], seq_len=report["flops"]["seq_len"],
        layers=report["layers"], dense_layers=report["dense_layers"], command=command, smoke=report["smoke"],
    )


def _hub_id(path: str) -> str | None:
    """``path`` when it names a model on the hub; ``None`` for a local directory or a built-in."""
    return None if ":" in path or Path(path).expanduser().exists() else path


def print_summary(report: Report) -> None:
    """A rich table of the headline figures on the console."""
    metric, flops, params = report["metric"], report["flops"], report["params"]
    table = Table(title=f"{report['task']} · {report['pruner']} · rate {report['rate']}")
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("pruned", justify="right")
    table.add_row(metric["name"], f"{metric['dense']:.4f}", f"{metric['pruned']:.4f}")
    if "pruned_int8" in metric:
        table.add_row(f"{metric['name']} (int8)", "", f"{metric['pruned_int8']:.4f}")
    table.add_row("GFLOPs / example", f"{flops['dense'] / 1e9:.3f}", f"{flops['pruned'] / 1e9:.3f}")
    table.add_row("parameters", f"{params['dense']:,}", f"{params['pruned']:,}")
    console.print(table)
    console.print(
        f"FLOPs reduction {flops['reduction']:.3f} · prune {report['timing'].get('prune', 0.0):.1f}s · "
        f"evaluate {report['timing'].get('evaluate_dense', 0.0):.1f}s dense, "
        f"{report['timing'].get('evaluate_pruned', 0.0):.1f}s pruned · "
        f"peak memory {report['peak_memory_mb']:.0f} MB · checkpoint {report['checkpoint']['path']} "
        f"({report['checkpoint']['bytes'] / 2**20:.1f} MiB)",
        highlight=False,
    )
    if (latency := report.get("latency")) is not None:
        low, high = latency["speedup_ci"]
        console.print(f"measured speedup {latency['speedup']:.2f}x (95% {low:.2f}-{high:.2f}) on "
                      f"{runtime_name(latency)}, target {latency['target_speedup']:.2f}x: "
                      f"{'met' if latency['met'] else 'MISSED'}", highlight=False)
        if latency.get("quantize") is not None:
            low, high = latency["speedup_over_float32_ci"]
            baseline = latency.get("baseline")
            verdict = "" if baseline is None else \
                f", target {baseline['target_speedup']:.2f}x: {'met' if baseline['met'] else 'MISSED'}"
            console.print(f"over the dense float32 model: {latency['speedup_over_float32']:.2f}x "
                          f"(95% {low:.2f}-{high:.2f}){verdict}", highlight=False)
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
