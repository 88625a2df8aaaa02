"""``kprune export``: a checkpoint as a deployable model (``format=onnx``): ``OUT/model.onnx``,
the tokenizer beside it and ``export.json`` (inputs, outputs, opset, the check's difference). A
sentence-embedding model (an embedding task) is exported with its pooling and normalisation: its one
output is ``sentence_embedding`` ``(batch, hidden)``, and ``export.json`` names the pooling. With
``quantize=int8`` also ``OUT/model.int8.onnx`` and, in ``export.json``, the quantization settings and
(given the task's data) the float32 and int8 models' dev metrics."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import DatasetDict
from omegaconf import DictConfig
from rich.markup import escape
from transformers import PreTrainedTokenizerBase

from kprune_cli.config.values import check_bool, check_int, check_optional_int, resolve_config
from kprune_cli.core.builtins import resolve_data_dir, resolve_model_path
from kprune_cli.core.evaluation import capped_evaluation_note, evaluate_model
from kprune_cli.deploy.onnx_model import (
    ONNX_FILE,
    OPSET,
    check_onnx_matches,
    example_inputs,
    export_onnx,
    input_names,
    onnx_difference,
    ort_session,
    output_names,
    require_onnx,
)
from kprune_cli.deploy.quantization import INT8_FILE, SessionModel, check_quantize, quantize_int8
from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.loading import load_model
from kprune_cli.runtime.console import console
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.output_dir import atomic_directory, check_output_dir, write_json_atomic
from kprune_cli.tasks.data import load_task_data
from kprune_cli.tasks.kinds.embedding import has_pooling, pooling_of
from kprune_cli.tasks.spec import TaskSpec, get_task

FORMATS = ("onnx",)
# (batch, tokens) of the random inputs the export is checked on: other shapes than the traced one.
CHECK_SHAPES = ((1, 7), (4, 45))


def run_export(cfg: DictConfig) -> dict:
    """Export ``cfg.checkpoint`` to ``cfg.output_dir``; print a line and one JSON line on stdout."""
    resolve_config(cfg)
    if str(cfg.format) not in FORMATS:
        raise UserError(f"format={cfg.format!r} is not allowed: choose one of {', '.join(FORMATS)}")
    quantize = check_quantize(cfg.quantize)
    batch_size = check_int("eval_batch_size", cfg.eval_batch_size, 1)
    max_examples = check_optional_int("eval_max_examples", cfg.eval_max_examples, 1)
    require_onnx()
    task = get_task(str(cfg.task.name))
    overwrite = check_bool("overwrite", cfg.overwrite)
    output = Path(str(cfg.output_dir))
    check_output_dir(output, overwrite)  # before loading anything
    checkpoint, _ = resolve_model_path(str(cfg.checkpoint), task, "cpu")
    data_dir = resolve_data_dir(task, cfg.data_dir) if quantize else None
    data = load_task_data(task, data_dir, splits=task.eval_splits) if data_dir is not None else None
    model, tokenizer = load_model(checkpoint, task, "cpu")
    with atomic_directory(output, overwrite=overwrite) as staging:
        export_onnx(model, staging / ONNX_FILE)
        session = ort_session(staging / ONNX_FILE)
        difference = max(check_onnx_matches(model, session, example_inputs(model, batch, tokens, seed=batch))
                         for batch, tokens in CHECK_SHAPES)
        tokenizer.save_pretrained(staging)
        summary = {"checkpoint": checkpoint, "task": task.name, "format": "onnx", "file": ONNX_FILE, "opset": OPSET,
                   "inputs": input_names(model), "outputs": output_names(model),
                   "layers": get_adapter(model).structure(), "max_abs_difference": difference}
        if has_pooling(model):
            pooling = pooling_of(model)
            summary["pooling"] = {"mode": pooling.mode, "normalize": pooling.normalize}
        if quantize:
            summary["quantization"] = quantize_int8(staging / ONNX_FILE, staging / INT8_FILE)
            int8 = ort_session(staging / INT8_FILE)
            summary["quantization"]["max_abs_difference"] = max(
                onnx_difference(model, int8, example_inputs(model, batch, tokens, seed=batch))
                for batch, tokens in CHECK_SHAPES)
            summary["quantization"] |= _dev_metrics(task, data, tokenizer, {"float32": session, "int8": int8},
                                                    batch_size, max_examples)
        write_json_atomic(staging / "export.json", summary)
    console.print(f"wrote {output / ONNX_FILE} (outputs within {difference:.1e} of PyTorch's) and the tokenizer",
                  highlight=False, soft_wrap=True)
    if quantize:
        _print_quantization(output, summary["quantization"])
    print(json.dumps({**summary, "output_dir": str(output)}))
    return summary


def _dev_metrics(task: TaskSpec, data: DatasetDict | None, tokenizer: PreTrainedTokenizerBase, sessions: dict,
                 batch_size: int, max_examples: int | None) -> dict:
    """``{"metrics": {precision: {metric: value}}}`` of each ONNX Runtime session (precision: session) on
    the task's dev split(s) of ``data``, evaluated as ``kprune eval`` does; a ``metrics_note`` instead
    without data."""
    if data is None:
        note = f"no dev metrics: pass data_dir=<the {task.name} data> to evaluate the float32 and int8 models"
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
        return {"metrics_note": note}
    metrics = {precision: evaluate_model(SessionModel(session), tokenizer, task, data, "cpu", batch_size=batch_size,
                                         max_examples=max_examples)
               for precision, session in sessions.items()}
    notes = capped_evaluation_note(task, data, max_examples)
    return {"metrics": metrics, "eval_max_examples": max_examples} | ({"metrics_note": notes[0]} if notes else {})


def _print_quantization(output: Path, quantization: dict) -> None:
    """A line naming the int8 file, and its dev metrics beside the float32 model's when measured."""
    sizes = quantization["bytes"]
    console.print(f"wrote {output / quantization['file']} ({sizes['int8'] / 2**20:.1f} MiB, float32 "
                  f"{sizes['float32'] / 2**20:.1f} MiB)", highlight=False, soft_wrap=True)
    for name, value in quantization.get("metrics", {}).get("int8", {}).items():
        console.print(f"dev {name}: int8 {value:.4f}, float32 {quantization['metrics']['float32'][name]:.4f}",
                      highlight=False)
