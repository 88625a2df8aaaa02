"""End-to-end tests of the ``kprune`` command on tiny models and tiny local data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kprune
from hydra import compose, initialize_config_dir
from kprune_helpers import DEVICES
from transformers import AutoModelForSequenceClassification

from kprune_cli.config.paths import CONFIG_DIR
from kprune_cli.core.stages import build_pruner
from kprune_cli.models.flops import FlopsModel
from kprune_cli.models.loading import load_model
from kprune_cli.tasks.spec import get_task


def run_args(checkpoint: Path, data: Path, output: Path, *extra: str, device: str = "cpu") -> list[str]:
    return ["run", "task=mrpc", f"model.path={checkpoint}", f"data_dir={data}", f"output_dir={output}",
            "calibration.num_tokens=300", "calibration.batch_size=8", f"device={device}", *extra]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pruner", ["kprune", "magnitude"])
def test_run_writes_checkpoint_and_report(pruner, device, tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    output = tmp_path / "out"
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, f"pruner={pruner}", "rate=0.5", device=device)) == 0
    assert f"device: {device}" in capsys.readouterr().err  # the start line names the device picked

    report = json.loads((output / "report.json").read_text())
    for key in ("task", "pruner", "rate", "seed", "device", "config", "versions", "metric", "flops", "params",
                "checkpoint", "layers", "timing", "peak_memory_mb"):
        assert key in report
    assert report["device"].startswith(device) and ("gpu" in report["versions"]) == (device == "cuda")
    assert report["numerics"] == {"deterministic": False, "matmul_precision": "highest"}
    assert report["task"] == "mrpc" and report["pruner"] == pruner and report["rate"] == 0.5
    assert set(report["metric"]["all"]["pruned"]) == {"accuracy", "f1"}
    assert 0.0 <= report["metric"]["pruned"] <= 1.0
    assert report["flops"]["pruned"] <= 0.5 * report["flops"]["dense"] * (1 + 1e-9)
    # KPMS keeps a prefix of the score order: the budget is missed by less than one unit's FLOPs.
    unit = FlopsModel(hidden_size=32, head_size=8, seq_len=report["flops"]["seq_len"]).head
    assert 0.5 - 1e-9 <= report["flops"]["reduction"] <= 0.5 + unit / report["flops"]["dense"]
    assert report["params"]["pruned"] < report["params"]["dense"]
    assert report["sample"]["tokens"] >= 300
    assert (output / "report.md").read_text().startswith("# kprune report: mrpc")
    assert not (output / ".kprune.lock").exists()

    checkpoint = Path(report["checkpoint"]["path"])
    assert report["checkpoint"]["bytes"] == sum(f.stat().st_size for f in checkpoint.iterdir())
    model, _ = load_model(str(checkpoint), get_task("mrpc"))
    assert [{"heads": p["heads"], "neurons": p["neurons"]} for p in report["layers"]] == [
        {"heads": layer.attention.output.dense.in_features // 8, "neurons": layer.output.dense.in_features}
        for layer in model.bert.encoder.layer
    ]
    stock = AutoModelForSequenceClassification.from_pretrained(checkpoint, trust_remote_code=True).eval()
    inputs = {"input_ids": torch.randint(5, 40, (2, 9))}
    torch.testing.assert_close(stock(**inputs).logits, model(**inputs).logits)


def test_eval_reproduces_the_reported_metric(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    output = tmp_path / "out"
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "rate=0.4")) == 0
    capsys.readouterr()
    assert kprune("eval", f"checkpoint={output / 'pruned'}", "task=mrpc", f"data_dir={mrpc_dir}", "device=cpu") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((output / "report.json").read_text())
    assert printed["metrics"] == pytest.approx(report["metric"]["all"]["pruned"])


@pytest.mark.parametrize("override, expected", [
    ("rate=1.5", "rate=1.5"),
    ("rate=0", "rate=0"),
    ("rate=abc", "rate='abc'"),
    ("device=tpu", "tpu"),
    ("task=stsb", "needs 1"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(override, expected, tiny_checkpoint, mrpc_dir, tmp_path,
                                                         capsys):
    output = tmp_path / "out"
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, override)) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err
    assert "Traceback" not in err
    assert not output.exists() or not any(output.iterdir())


def test_missing_data_dir_is_a_clean_error(tiny_checkpoint, tmp_path, capsys):
    output = tmp_path / "out"
    assert kprune(*run_args(tiny_checkpoint, tmp_path / "nowhere", output)) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err
    assert not (output / "report.json").exists()


def test_unknown_task_and_pruner_options_exit_2(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, tmp_path / "a", "task=nope")) == 2
    assert "nope" in capsys.readouterr().err
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, tmp_path / "b", "pruner=nope")) == 2
    assert "nope" in capsys.readouterr().err


def test_non_empty_output_dir_is_refused_unless_overwrite(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "pruner=magnitude")) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == ["keep.txt"]
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "pruner=magnitude", "overwrite=true")) == 0
    assert (output / "report.json").exists() and (output / "keep.txt").exists()


def test_unknown_command_and_help(capsys):
    assert kprune("frobnicate") == 2
    assert "frobnicate" in capsys.readouterr().err
    assert kprune("--help") == 0
    assert "commands:" in capsys.readouterr().out


PRUNER_CONFIGS = sorted(path.stem for path in (CONFIG_DIR / "pruner").glob("*.yaml"))


def test_the_pruner_config_group_is_found():
    assert {"kprune", "kwon", "magnitude", "random"} <= set(PRUNER_CONFIGS)


@pytest.mark.parametrize("pruner", PRUNER_CONFIGS)
def test_every_pruner_config_composes(pruner, capsys):
    assert kprune("run", f"pruner={pruner}", "--cfg", "job") == 0
    assert "_target_: kprune_cli.pruners." in capsys.readouterr().out


@pytest.mark.parametrize("pruner", PRUNER_CONFIGS)
def test_every_pruner_config_builds_its_pruner(pruner):
    """Every key of the config is a constructor argument of its ``_target_`` (none ignored)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("run", overrides=[f"pruner={pruner}"])
    built = build_pruner(cfg.pruner, pruner)
    assert f"{type(built).__module__}.{type(built).__name__}" == cfg.pruner._target_


@pytest.mark.parametrize("override, closest", [
    ("rtae=0.5", "rate"),
    ("calibration.num_token=5", "calibration.num_tokens"),
    ("pruner.gradient_batchx=3", "pruner.gradient_batch"),
])
def test_mistyped_key_is_one_line_naming_the_closest_keys(override, closest, tmp_path, capsys):
    assert kprune("run", override, f"output_dir={tmp_path / 'out'}") == 2
    err = capsys.readouterr().err.strip()
    key = override.split("=")[0]
    assert len(err.splitlines()) == 1 and f"unknown key {key!r}" in err and f"did you mean {closest}" in err
    assert "+" + key not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pruner", ["kprune", "kwon"])
def test_the_old_pruner_batch_size_names_the_two_keys_that_replace_it(pruner, tmp_path, capsys):
    assert kprune("run", f"pruner={pruner}", "pruner.batch_size=16", f"output_dir={tmp_path / 'out'}") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pruner.micro_batch_size" in err and "pruner.gradient_batch" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("command", "given", "taken"), [("latency-table", "model.path", "checkpoint"),
                                                        ("eval", "model.path", "checkpoint"),
                                                        ("run", "checkpoint", "model.path")])
def test_the_other_commands_model_key_names_this_ones(command, given, taken, capsys):
    assert kprune(command, f"{given}=some/model") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"unknown key {given!r}" in err and f"takes its model as {taken}=" in err


@pytest.mark.parametrize(("override", "named", "closest"), [("pruner=kprnue", "pruner=kprnue", "kprune"),
                                                        ("task=sst3", "task=sst3", "sst2"),
                                                        ("pruner=kprune,kwn", "pruner=kwn", "kwon")])
def test_a_group_option_without_a_file_is_one_line_naming_the_options(override, named, closest, tmp_path, capsys):
    assert kprune("run", override, f"output_dir={tmp_path / 'out'}") == 2
    err = capsys.readouterr().err.strip()
    group = named.split("=")[0]
    options = sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {named}: no such {group}: did you mean {closest}?")
    assert err.endswith(f"choose one of {', '.join(options)}")


def test_known_keys_follow_the_group_choice_within_one_process(tmp_path, capsys):
    """The known keys are cached per group choice: a key of one option is known under it and
    refused under another, whichever was checked first in the process."""
    assert kprune("run", "pruner=kprune", "pruner.mu=8", "--cfg", "job") == 0
    assert kprune("run", "pruner=kwon", "pruner.mu=8", f"output_dir={tmp_path / 'out'}") == 2
    assert "unknown key 'pruner.mu'" in capsys.readouterr().err
    assert kprune("run", "pruner=kprune", "pruner.mu=8", "--cfg", "job") == 0


def test_keys_of_a_chosen_group_option_and_added_keys_are_known(capsys):
    assert kprune("run", "pruner=kwon", "pruner.rearrange=false", "--cfg", "job") == 0
    assert kprune("run", "+extra_note=1", "--cfg", "job") == 0
    assert "extra_note: 1" in capsys.readouterr().out


def test_a_bad_value_is_reported_before_torch_is_imported(tmp_path):
    """The run's checks come before the heavy imports (torch, transformers, datasets)."""
    probe = ("import sys\nfrom kprune_cli.cli.main import main\n"
             f"sys.argv = ['kprune', 'run', 'rate=2', 'output_dir={tmp_path / 'out'}']\n"
             "try:\n    main()\nexcept SystemExit as exit_:\n"
             "    print(exit_.code, sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "2 []", result.stderr
    assert "rate=2 is out of range" in result.stderr
    assert not (tmp_path / "out").exists()


def test_smoke_preset_caps_evaluation_reloads_and_marks_the_report(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    output = tmp_path / "out"
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "preset=smoke", "eval_max_examples=10")) == 0
    report = json.loads((output / "report.json").read_text())
    assert report["smoke"] is True and report["config"]["calibration"]["num_tokens"] == 300  # the command line wins
    notes = " ".join(report["notes"])
    assert "smoke run" in notes and "eval_max_examples=10: validation 10 of 24" in notes
    assert "checkpoint reloaded and compared" in notes and "check_reload" in report["timing"]
    assert "**Smoke run" in (output / "report.md").read_text()
    capsys.readouterr()
    assert kprune("eval", f"checkpoint={output / 'pruned'}", "task=mrpc", f"data_dir={mrpc_dir}", "device=cpu",
                  "eval_max_examples=10") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["metrics"] == pytest.approx(report["metric"]["all"]["pruned"])


def test_smoke_preset_sets_a_small_sample_and_capped_evaluation(capsys):
    assert kprune("run", "task=squad", "preset=smoke", "--cfg", "job") == 0
    composed = capsys.readouterr().out
    assert "num_tokens: 2000" in composed and "eval_max_examples: 100" in composed
    assert "check_reload: true" in composed and "smoke: true" in composed


def test_a_plain_run_is_no_smoke_run(tiny_checkpoint, mrpc_dir, tmp_path):
    output = tmp_path / "out"
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, output, "pruner=magnitude")) == 0
    report = json.loads((output / "report.json").read_text())
    assert report["smoke"] is False and not any("smoke" in note or "reloaded" in note for note in report["notes"])
    assert "Smoke run" not in (output / "report.md").read_text()


@pytest.mark.parametrize("command", ["run", "eval"])
def test_a_bad_eval_dtype_is_one_line(command, tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    where = [f"model.path={tiny_checkpoint}", f"output_dir={tmp_path / 'out'}"] if command == "run" \
        else [f"checkpoint={tiny_checkpoint}"]
    assert kprune(command, "task=mrpc", *where, f"data_dir={mrpc_dir}", "eval_dtype=fp64") == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("eval_dtype='fp64' is not allowed: give fp32, bf16, fp16") and "\n" not in error


def test_eval_in_bf16_scores_and_warns_where_bf16_is_emulated(tiny_checkpoint, mrpc_dir, monkeypatch, capsys):
    from kprune_cli.runtime import hardware
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    scores = {}
    for precision in ("fp32", "bf16"):
        assert kprune("eval", f"checkpoint={tiny_checkpoint}", "task=mrpc", f"data_dir={mrpc_dir}", "device=cpu",
                      f"eval_dtype={precision}") == 0
        captured = capsys.readouterr()
        printed = json.loads(captured.out.strip().splitlines()[-1])
        assert printed["eval_dtype"] == precision
        scores[precision] = printed["metrics"]
        warned = "warning: eval_dtype=bf16: this CPU" in captured.err
        assert warned == (precision == "bf16")
    # a random tiny model's predictions sit near ties, so bf16 may flip many: only the scoring is compared
    assert scores["bf16"].keys() == scores["fp32"].keys()
    assert all(0.0 <= scores["bf16"][key] <= 1.0 for key in ("accuracy", "f1"))
