"""Progress: rich's live display in a terminal, plain lines anywhere else (log files, CI, SLURM)."""

from __future__ import annotations

import io
import re

import pytest
from conftest import kprune
from rich.console import Console
from rich.progress import Progress

import kprune_cli.runtime.console as console_module
from kprune_cli.runtime.console import LogProgress, make_progress

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # escapes, carriage returns ... (not newlines)


def run_args(checkpoint, data, output, *extra: str) -> list[str]:
    return ["run", "task=mrpc", f"model.path={checkpoint}", f"data_dir={data}", f"output_dir={output}",
            "calibration.num_tokens=300", "calibration.batch_size=8", "device=cpu", *extra]


def test_log_lines_one_per_step_and_per_tenth_of_a_long_stage(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(console_module, "console", Console(file=out, width=200))
    progress = make_progress()
    assert isinstance(progress, LogProgress)
    with progress:
        short = progress.add_task("K-prune", total=4)
        for step in range(4):
            progress.update(short, description=f"K-prune FFN {step}")
            progress.advance(short)
        long = progress.add_task("fine-tuning", total=200)
        for step in range(1, 201):
            progress.update(long, completed=step)
    lines = out.getvalue().splitlines()
    assert lines[0] == "K-prune (0/4)" and lines[1].startswith("K-prune FFN 0 (1/4) ")
    assert re.fullmatch(r"K-prune FFN 2 \(3/4\) \d+ s elapsed, ~\d+ s left", lines[3])
    assert re.fullmatch(r"K-prune FFN 3 \(4/4\) \d+ s elapsed", lines[4])
    assert len([line for line in lines if line.startswith("fine-tuning (")]) == 1 + 10
    assert not CONTROL.search(out.getvalue())


def test_terminal_keeps_the_live_display(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(console_module, "console", Console(file=out, force_terminal=True, width=100))
    progress = make_progress()
    assert type(progress) is Progress
    with progress:
        task = progress.add_task("K-prune", total=2)
        progress.advance(task)
        progress.refresh()
    assert "\x1b[" in out.getvalue()  # a redrawn display, as before


@pytest.mark.parametrize("pruner, expected", [
    ("kprune", ["K-prune (0/4)", "K-prune MHA 0 (1/4)", "K-prune FFN 0 (2/4)", "K-prune FFN 1 (4/4)"]),
    ("kwon", ["Kwon et al.: Fisher (0/", "Kwon et al.: rearrange (4/4)", "Kwon et al.: mask tuning (2/2)"]),
])
def test_a_run_into_a_log_file_prints_plain_progress_lines(pruner, expected, tiny_checkpoint, mrpc_dir, tmp_path,
                                                           capsys):
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, tmp_path / "out", f"pruner={pruner}")) == 0
    err = capsys.readouterr().err
    for start in expected:
        assert any(line.startswith(start) for line in err.splitlines()), (start, err)
    assert any(line.startswith("validation (24/24)") for line in err.splitlines())
    assert not CONTROL.search(err)
