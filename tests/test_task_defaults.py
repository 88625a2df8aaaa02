"""``kprune run task=<task>`` with no model prunes the task's default model (configs/task/), named on the
console and in the report; offline, one line names the ways out. The hub is faked: the loader maps the
default hub id onto a tiny local checkpoint."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import kprune

from kprune_cli.config.paths import CONFIG_DIR
from kprune_cli.models import loading
from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.spec import TASKS

DEFAULT_MRPC = "textattack/bert-base-uncased-MRPC"


def task_default(task: str) -> str | None:
    return yaml.safe_load((CONFIG_DIR / "task" / f"{task}.yaml").read_text()).get("default_model")


def test_every_real_task_names_a_default_hub_model_or_says_why_not():
    for name in TASKS:
        text = (CONFIG_DIR / "task" / f"{name}.yaml").read_text()
        assert "default_model:" in text, name
        if name in ("demo", "mnli"):
            assert task_default(name) is None
        else:
            assert "/" in task_default(name), name  # an owner/name hub id


@pytest.fixture
def fake_hub(monkeypatch, tiny_checkpoint) -> list[str]:
    """The model paths the run looked up; mrpc's default hub id resolves to the tiny checkpoint."""
    asked: list[str] = []
    locate = loading.locate_model

    def locate_on_fake_hub(path: str) -> str:
        asked.append(path)
        return locate(str(tiny_checkpoint) if path == DEFAULT_MRPC else path)

    monkeypatch.setattr(loading, "locate_model", locate_on_fake_hub)
    return asked


def test_a_task_run_without_a_model_prunes_the_tasks_default(fake_hub, mrpc_dir, tmp_path, capsys):
    output = tmp_path / "out"
    assert kprune("run", "task=mrpc", f"data_dir={mrpc_dir}", f"output_dir={output}", "calibration.num_tokens=300",
                  "calibration.batch_size=8", "device=cpu") == 0
    assert set(fake_hub) == {DEFAULT_MRPC}
    printed = capsys.readouterr().err  # the console's progress lines go to stderr
    assert DEFAULT_MRPC in printed and "task=mrpc's default" in printed and "expected time on" in printed
    report = json.loads((output / "report.json").read_text())
    assert any(DEFAULT_MRPC in note for note in report["notes"])


def test_a_model_given_on_the_command_line_wins_over_the_default(fake_hub, tiny_checkpoint, mrpc_dir, tmp_path):
    assert kprune("run", "task=mrpc", f"model.path={tiny_checkpoint}", f"data_dir={mrpc_dir}",
                  f"output_dir={tmp_path / 'out'}", "calibration.num_tokens=300", "device=cpu") == 0
    assert set(fake_hub) == {str(tiny_checkpoint)}


def test_offline_the_error_is_one_line_naming_both_ways_out(monkeypatch, mrpc_dir, tmp_path, capsys):
    def unreachable(path: str) -> str:
        raise UserError(f"cannot load {path!r}: it is not a local directory and the Hugging Face hub is unreachable")

    monkeypatch.setattr(loading, "locate_model", unreachable)
    output = tmp_path / "out"
    assert kprune("run", "task=mrpc", f"data_dir={mrpc_dir}", f"output_dir={output}", "device=cpu") == 2
    *progress, err = capsys.readouterr().err.strip().splitlines()  # the device and model picked, then the error
    assert any("task=mrpc's default" in line for line in progress) and err.startswith("error: ")
    assert not any(line.startswith("error") or "Traceback" in line for line in progress)
    assert DEFAULT_MRPC in err and "model.path=" in err and "kprune finetune task=mrpc" in err
    assert not (output / "pruned").exists()


def test_a_task_without_a_default_asks_for_a_model(mrpc_dir, tmp_path, capsys):
    assert kprune("run", "task=mnli", f"data_dir={mrpc_dir}", f"output_dir={tmp_path / 'out'}", "device=cpu") == 2
    assert "model.path=" in capsys.readouterr().err
