"""``kprune export``: a checkpoint as a deployable model (``format=onnx``): ``OUT/model.onnx``,
the tokenizer beside it and ``export.json`` (inputs, outputs, opset, the check's difference)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from kprune_cli.config.values import check_bool, resolve_config
from kprune_cli.core.builtins import resolve_model_path
from kprune_cli.deploy.onnx_model import (
    ONNX_FILE,
    OPSET,
    check_onnx_matches,
    example_inputs,
    export_onnx,
    input_names,
    ort_session,
    output_names,
    require_onnx,
)
from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.loading import load_model
from kprune_cli.runtime.console import console
from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.output_dir import atomic_directory, check_output_dir, write_json_atomic
from kprune_cli.tasks.spec import get_task

FORMATS = ("onnx",)
# (batch, tokens) of the random inputs the export is checked on: other shapes than the traced one.
CHECK_SHAPES = ((1, 7), (4, 45))


def run_export(cfg: DictConfig) -> dict:
    """Export ``cfg.checkpoint`` to ``cfg.output_dir``; print a line and one JSON line on stdout."""
    resolve_config(cfg)
    if str(cfg.format) not in FORMATS:
        raise UserError(f"format={cfg.format!r} is not allowed: choose one of {', '.join(FORMATS)}")
    require_onnx()
    task = get_task(str(cfg.task.name))
    overwrite = check_bool("overwrite", cfg.overwrite)
    output = Path(str(cfg.output_dir))
    check_output_dir(output, overwrite)  # before loading anything
    checkpoint, _ = resolve_model_path(str(cfg.checkpoint), task, "cpu")
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
        write_json_atomic(staging / "export.json", summary)
    console.print(f"wrote {output / ONNX_FILE} (outputs within {difference:.1e} of PyTorch's) and the tokenizer",
                  highlight=False, soft_wrap=True)
    print(json.dumps({**summary, "output_dir": str(output)}))
    return summary
