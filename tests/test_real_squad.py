"""End to end on the real MiniLM fine-tuned on SQuAD v1.1 (../shared): K-prune at half the FLOPs
keeps F1 near dense and far above magnitude's, and its checkpoint reloads with stock transformers.

The model was trained on the first half of dev-v1.1.json by article; kprune splits the same file
the same way, so the calibration sample comes from the training articles and the evaluation from
the held-out ones (here the first EVAL_QUESTIONS of them, to keep the test near a minute).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import kprune
from transformers import AutoModelForQuestionAnswering

from kprune_cli.models.loading import load_model
from kprune_cli.tasks.spec import get_task

pytestmark = pytest.mark.slow

EVAL_QUESTIONS = 200
CALIBRATION_QUESTIONS = 64
F1_MARGIN = 0.10  # K-prune at rate 0.5 on a 64-question sample: within 10 F1 points of dense (measured: 7.0 down)


def prune(shared_dir: Path, output: Path, pruner: str) -> dict:
    code = kprune("run", "task=squad", f"model.path={shared_dir / 'models/minilm-squad'}",
                  f"data_dir={shared_dir / 'data/squad'}", f"pruner={pruner}", "rate=0.5",
                  f"calibration.num_examples={CALIBRATION_QUESTIONS}", f"eval_max_examples={EVAL_QUESTIONS}",
                  "device=cpu", f"output_dir={output}")
    assert code == 0
    return json.loads((output / "report.json").read_text())


def test_kprune_keeps_squad_f1_at_half_the_flops_and_reloads(shared_dir, tmp_path):
    kprune_report = prune(shared_dir, tmp_path / "kprune", "kprune")
    magnitude_report = prune(shared_dir, tmp_path / "magnitude", "magnitude")

    dense, pruned = kprune_report["metric"]["dense"], kprune_report["metric"]["pruned"]
    assert kprune_report["metric"]["name"] == "f1" and dense > 0.5  # a real QA model, not a random one
    assert pruned >= dense - F1_MARGIN
    assert pruned > magnitude_report["metric"]["pruned"] + 0.1
    for report in (kprune_report, magnitude_report):
        assert report["flops"]["reduction"] == pytest.approx(0.5, abs=0.01)
        assert report["sample"]["examples"] == CALIBRATION_QUESTIONS <= report["sample"]["windows"]
    settings = kprune_report["pruner_settings"]
    assert settings["gradient_batch"] == 12  # the official SQuAD batch
    assert all(entry["ratio"] > 0 for entry in settings["kpwt_held_out"].values())  # KPWT's held-out check ran

    checkpoint = Path(kprune_report["checkpoint"]["path"])
    ours, tokenizer = load_model(str(checkpoint), get_task("squad"))
    stock = AutoModelForQuestionAnswering.from_pretrained(checkpoint, trust_remote_code=True,
                                                          dtype=torch.float32).eval()
    inputs = tokenizer(["Where does the water go?"], ["The river carries the water to the sea, far to the north."],
                       return_tensors="pt")
    with torch.inference_mode():
        theirs, mine = stock(**inputs), ours(**inputs)
    torch.testing.assert_close(theirs.start_logits, mine.start_logits)
    torch.testing.assert_close(theirs.end_logits, mine.end_logits)
