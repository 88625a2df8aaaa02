"""End-to-end runs on the real MiniLM fine-tuned on GLUE tasks (../shared); minutes in total.

Small calibration samples keep them CI-sized; the thresholds are loose enough for that and
tight enough to catch a broken method (a collapsed model scores the majority class).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import kprune
from transformers import AutoModelForSequenceClassification

from kprune_cli.models.loading import load_model
from kprune_cli.tasks.spec import get_task

pytestmark = pytest.mark.slow


def prune(shared_dir: Path, tmp_path: Path, task: str, pruner: str, rate: float, tokens: int) -> dict:
    output = tmp_path / f"{task}-{pruner}-{rate}"
    code = kprune("run", f"task={task}", f"model.path={shared_dir / 'models' / f'minilm-{task}'}",
                  f"data_dir={shared_dir / 'data' / 'glue' / task}", f"pruner={pruner}", f"rate={rate}",
                  f"calibration.num_tokens={tokens}", "device=cpu", f"output_dir={output}")
    assert code == 0
    return json.loads((output / "report.json").read_text())


def test_kprune_keeps_mrpc_accuracy_at_half_the_flops(shared_dir, tmp_path):
    report = prune(shared_dir, tmp_path, "mrpc", "kprune", 0.5, 4000)

    assert report["metric"]["dense"] == pytest.approx(0.8039, abs=1e-3)  # the model's recorded dev accuracy
    assert report["metric"]["pruned"] >= report["metric"]["dense"] - 0.05
    assert report["flops"]["reduction"] == pytest.approx(0.5, abs=0.01)
    assert report["params"]["pruned"] < report["params"]["dense"]

    checkpoint = Path(report["checkpoint"]["path"])
    ours, tokenizer = load_model(str(checkpoint), get_task("mrpc"))
    stock = AutoModelForSequenceClassification.from_pretrained(checkpoint, trust_remote_code=True,
                                                               dtype=torch.float32).eval()
    inputs = tokenizer(["The company said profits rose."], ["Profits went up, the firm said."], return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(stock(**inputs).logits, ours(**inputs).logits)


def test_kprune_beats_magnitude_on_stsb_at_high_rate(shared_dir, tmp_path):
    kprune_report = prune(shared_dir, tmp_path, "stsb", "kprune", 0.8, 2000)
    magnitude_report = prune(shared_dir, tmp_path, "stsb", "magnitude", 0.8, 2000)

    for report in (kprune_report, magnitude_report):
        assert report["flops"]["pruned"] <= 0.2 * report["flops"]["dense"] * (1 + 1e-9)
    assert kprune_report["metric"]["pruned"] > magnitude_report["metric"]["pruned"] + 0.1
