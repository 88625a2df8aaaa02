"""``kprune summarize``: finding runs, mean ± std over seeds, failed/incomplete runs, plots (hand-made reports)."""

from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from conftest import kprune

from kprune_cli.cli.compare import DEFAULTS, comparison_overrides
from kprune_cli.cli.summarize import summary_rows, write_summary
from kprune_cli.core.report import SCHEMA_VERSION
from kprune_cli.runtime.output_dir import LOCK_NAME
from kprune_cli.sweeps.collect import find_runs
from kprune_cli.sweeps.plots import layer_survivors_figure, metric_vs_flops_figure

DENSE_LAYERS = [{"heads": 4, "neurons": 64}, {"heads": 4, "neurons": 64}]


def make_report(*, pruner: str = "kprune", rate: float = 0.4, seed: int = 0, pruned: float = 0.8,
                dense: float = 0.85, reduction: float = 0.4, prune_seconds: float = 2.0, lambda_rep: float = 2.5e-4,
                layers: list[dict[str, int]] | None = None) -> dict:
    """A report.json payload (schema 1) with the fields summarize reads."""
    return {
        "schema_version": SCHEMA_VERSION, "task": "mrpc", "pruner": pruner, "rate": rate, "seed": seed,
        "config": {"model": {"name": "custom", "path": "/models/minilm-mrpc"}, "rate": rate, "seed": seed,
                   "output_dir": f"/runs/{pruner}-{rate}-{seed}",
                   "calibration": {"num_tokens": 1000, "seed": seed},
                   "pruner": {"_target_": f"pruners.{pruner}", "lambda_rep": lambda_rep}},
        "metric": {"name": "accuracy", "dense": dense, "pruned": pruned},
        "flops": {"dense": 1e9, "pruned": (1 - reduction) * 1e9, "reduction": reduction},
        "checkpoint": {"path": f"/runs/{pruner}-{rate}-{seed}/pruned"},
        "layers": layers or [{"heads": 3, "neurons": 16}, {"heads": 1, "neurons": 48}],
        "dense_layers": DENSE_LAYERS,
        "timing": {"prune": prune_seconds},
    }


def write_run(directory: Path, report: dict) -> Path:
    directory.mkdir(parents=True)
    (directory / "report.json").write_text(json.dumps(report))
    return directory


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep directory: kprune at two rates × three seeds, magnitude at one rate, one failed job,
    one job that never started (empty) and one that died (lock file, no report)."""
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    metrics = {0: 0.80, 1: 0.82, 2: 0.84}
    for seed, metric in metrics.items():
        write_run(root / f"k4-{seed}", make_report(seed=seed, pruned=metric, reduction=0.40 + seed / 100,
                                                    prune_seconds=1.0 + seed))
        write_run(root / f"k8-{seed}", make_report(rate=0.8, seed=seed, pruned=metric - 0.1, reduction=0.8))
    write_run(root / "m4-0", make_report(pruner="magnitude", pruned=0.6, reduction=0.41))
    (root / "failed").mkdir()
    (root / "failed" / "FAILED.json").write_text(json.dumps({"error": "RuntimeError: out of memory\nmore", "config": {}}))
    (root / "empty").mkdir()
    (root / "died").mkdir()
    (root / "died" / LOCK_NAME).write_text("123\n")
    (root / ".submitit").mkdir()  # launcher logs: not a run
    return root


def test_runs_are_classified_finished_failed_incomplete(sweep):
    runs = find_runs([sweep])
    assert sorted(run.path.name for run in runs.finished) == ["k4-0", "k4-1", "k4-2", "k8-0", "k8-1", "k8-2", "m4-0"]
    assert [(run.path.name, run.error) for run in runs.failed] == [("failed", "RuntimeError: out of memory")]
    assert sorted(path.name for path in runs.incomplete) == ["died", "empty"]


def test_rows_are_mean_and_std_over_seeds(sweep):
    rows = summary_rows(find_runs([sweep]).finished)
    assert [(row["pruner"], row["rate"]) for row in rows] == [("kprune", 0.4), ("kprune", 0.8), ("magnitude", 0.4)]
    k4 = rows[0]
    assert k4["seeds"] == [0, 1, 2] and k4["model"] == "minilm-mrpc" and k4["variant"] == ""
    assert k4["metric_mean"] == pytest.approx(0.82) and k4["metric_std"] == pytest.approx(0.02)
    assert k4["flops_reduction_mean"] == pytest.approx(0.41) and k4["flops_reduction_std"] == pytest.approx(0.01)
    assert k4["prune_seconds_mean"] == pytest.approx(2.0) and k4["prune_seconds_std"] == pytest.approx(1.0)
    assert k4["dense_metric"] == pytest.approx(0.85)
    assert rows[2]["seeds"] == [0] and rows[2]["metric_std"] is None


def test_runs_with_other_settings_are_not_averaged_together(tmp_path):
    write_run(tmp_path / "a", make_report(lambda_rep=2.5e-4, pruned=0.8))
    write_run(tmp_path / "b", make_report(lambda_rep=1e-5, pruned=0.7))
    write_run(tmp_path / "c", make_report(pruner="magnitude"))
    rows = summary_rows(find_runs([tmp_path]).finished)
    assert [(row["pruner"], row["variant"], row["metric_mean"]) for row in rows] == [
        ("kprune", "pruner.lambda_rep=0.00025", pytest.approx(0.8)),
        ("kprune", "pruner.lambda_rep=1e-05", pytest.approx(0.7)),
        ("magnitude", "", pytest.approx(0.8)),
    ]


def test_summary_files_list_failed_and_incomplete_runs(sweep, tmp_path):
    out = tmp_path / "out"
    written = write_summary(find_runs([sweep]), out)
    assert {path.name for path in written} == {"summary.csv", "summary.md", "summary.json", "plot-mrpc-minilm-mrpc.png"}
    with (out / "summary.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["pruner"], row["rate"], row["seeds"]) for row in rows] == [
        ("kprune", "0.4", "0 1 2"), ("kprune", "0.8", "0 1 2"), ("magnitude", "0.4", "0")]
    assert float(rows[0]["metric_mean"]) == pytest.approx(0.82)
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(run["path"]).name for run in summary["failed"]] == ["failed"]
    assert sorted(Path(path).name for path in summary["incomplete"]) == ["died", "empty"]
    markdown = (out / "summary.md").read_text()
    assert "| mrpc | minilm-mrpc | kprune | 0.4 | 3 | accuracy | 85.00 | 82.00 ± 2.00 | 41.0 ± 1.0 |" in markdown
    assert "## Failed runs" in markdown and "RuntimeError: out of memory" in markdown
    assert "## Incomplete runs" in markdown and "died" in markdown


def test_metric_vs_flops_plot_has_one_line_per_pruner_and_dense_lines(sweep, tmp_path):
    rows = summary_rows(find_runs([sweep]).finished)
    axes = metric_vs_flops_figure(rows).axes[0]
    lines = {line.get_label(): line for line in axes.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"kprune", "magnitude", "dense (85.00)", "dense − 3 points"}
    np.testing.assert_allclose(lines["kprune"].get_xdata(), [41.0, 80.0])
    np.testing.assert_allclose(lines["kprune"].get_ydata(), [82.0, 72.0])
    np.testing.assert_allclose(lines["magnitude"].get_ydata(), [60.0])
    np.testing.assert_allclose(lines["dense (85.00)"].get_ydata(), [85.0, 85.0])
    np.testing.assert_allclose(lines["dense − 3 points"].get_ydata(), [82.0, 82.0])
    assert lines["dense − 3 points"].get_linestyle() == "--"

    write_summary(find_runs([sweep]), tmp_path / "out")
    image = matplotlib.image.imread(tmp_path / "out" / "plot-mrpc-minilm-mrpc.png")
    assert image.shape[0] >= 400 and image.shape[1] >= 600
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_layer_heatmap_colours_fraction_kept_and_labels_counts(tmp_path):
    report = make_report(layers=[{"heads": 2, "neurons": 16}, {"heads": 0, "neurons": 64}])
    figure = layer_survivors_figure(report)
    axes = figure.axes[0]
    np.testing.assert_allclose(axes.get_images()[0].get_array(), [[0.5, 0.0], [0.25, 1.0]])
    assert sorted(text.get_text() for text in axes.texts) == ["0", "16", "2", "64"]


def test_summarize_command(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert kprune("summarize", str(sweep), "-o", str(out), "--layers", str(sweep / "k4-0")) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("# kprune summary")
    assert "failed" in captured.err and "incomplete" in captured.err
    heatmap = matplotlib.image.imread(out / "layers-k4-0.png")
    assert heatmap.shape[0] > 100 and heatmap[..., :3].std() > 0.05
    assert kprune("summarize", str(sweep)) == 0  # default output: the first directory
    assert (sweep / "summary.md").exists()


def test_summarize_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert kprune("summarize", str(tmp_path / "nowhere")) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "only-failed").mkdir()
    (tmp_path / "only-failed" / "FAILED.json").write_text(json.dumps({"error": "ValueError: x"}))
    assert kprune("summarize", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "no finished run" in err and "1 failed" in err and "Traceback" not in err
    assert kprune("summarize", str(tmp_path), "--layers", str(tmp_path / "only-failed")) == 2


def test_comparison_overrides_sweep_pruner_and_rate():
    now = datetime(2024, 5, 1, 12, 0, 0)
    overrides, directory = comparison_overrides(["-m", "task=mrpc", "pruners=kprune,magnitude", "seed=0,1"], now)
    assert overrides == ["task=mrpc", "pruner=kprune,magnitude", "seed=0,1", f"rate={DEFAULTS['rate']}",
                         "output_dir=outputs/compare-mrpc-20240501-120000"]
    assert directory == Path("outputs/compare-mrpc-20240501-120000")
    overrides, directory = comparison_overrides(["rate=0.5", "output_dir=x"], now)
    assert overrides == ["rate=0.5", "output_dir=x", f"pruner={DEFAULTS['pruner']}"] and directory == Path("x")
