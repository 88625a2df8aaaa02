"""calibration.source: an unlabeled text or JSONL file as the calibration sample."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import kprune
from safetensors.torch import load_file

from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.spec import get_task
from kprune_cli.tasks.unlabeled import read_unlabeled


def run_args(checkpoint: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["run", "task=mrpc", f"model.path={checkpoint}", f"data_dir={data}", f"output_dir={output}",
            "calibration.num_tokens=300", "calibration.batch_size=8", "device=cpu", *extra]


def train_rows(data_dir: Path) -> list[dict[str, str]]:
    with (data_dir / "train.csv").open() as file:
        return list(csv.DictReader(file))


def dev_only(data_dir: Path, target: Path) -> Path:
    """A copy of the data with the dev split alone: a source needs no train split."""
    target.mkdir()
    shutil.copy(data_dir / "validation.csv", target / "validation.csv")
    return target


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_kprune_on_unlabeled_text_equals_the_labelled_split(suffix, tiny_checkpoint, mrpc_dir, tmp_path):
    """The train split with its labels removed gives K-prune the same sample, hence the same masks
    and weights, as the labelled split with the same seed."""
    source = tmp_path / f"unlabeled{suffix}"
    rows = train_rows(mrpc_dir)
    if suffix == ".txt":
        source.write_text("".join(f"{row['sentence1']}\t{row['sentence2']}\n" for row in rows))
    else:
        source.write_text("".join(json.dumps({"sentence1": row["sentence1"], "sentence2": row["sentence2"]}) + "\n"
                                  for row in rows))
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, tmp_path / "labelled")) == 0
    assert kprune(*run_args(tiny_checkpoint, dev_only(mrpc_dir, tmp_path / "dev"), tmp_path / "unlabeled",
                            f"calibration.source={source}")) == 0
    labelled, unlabeled = (json.loads((tmp_path / name / "report.json").read_text())
                           for name in ("labelled", "unlabeled"))
    assert unlabeled["layers"] == labelled["layers"] and unlabeled["sample"] == labelled["sample"]
    assert unlabeled["metric"] == labelled["metric"]  # evaluation: the dev split, as before
    assert any("unlabeled file" in note for note in unlabeled["notes"])
    weights = [load_file(tmp_path / name / "pruned" / "model.safetensors") for name in ("labelled", "unlabeled")]
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][key] == weights[1][key]).all() for key in weights[0])


def test_a_pruner_that_needs_labels_refuses_an_unlabeled_source(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    source = tmp_path / "unlabeled.txt"
    source.write_text("one\ttwo\n")
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, tmp_path / "out", "pruner=kwon",
                            f"calibration.source={source}")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pruner=kwon needs labelled calibration data" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_source_is_a_one_line_error(tiny_checkpoint, mrpc_dir, tmp_path, capsys):
    assert kprune(*run_args(tiny_checkpoint, mrpc_dir, tmp_path / "out", f"calibration.source={tmp_path / 'no'}")) == 2
    assert "is not a file" in capsys.readouterr().err


def test_reader_names_the_bad_line(tmp_path):
    mrpc, sst2, squad = get_task("mrpc"), get_task("sst2"), get_task("squad")
    text = tmp_path / "pairs.txt"
    text.write_text("a\tb\n\nno tab here\n")
    with pytest.raises(UserError, match=r"pairs.txt:3: .* separated by one tab, this line has 0 tabs"):
        read_unlabeled(mrpc, text)
    assert read_unlabeled(sst2, text)["sentence"] == ["a\tb", "no tab here"]  # blank lines skipped
    records = tmp_path / "qa.jsonl"
    records.write_text(json.dumps({"question": "who?", "context": "me.", "answers": "ignored"}) + "\n")
    assert read_unlabeled(squad, records).to_list() == [{"question": "who?", "context": "me.", "id": "0"}]
    records.write_text(json.dumps({"question": "who?"}) + "\n")
    with pytest.raises(UserError, match=r"qa.jsonl:1: .* missing or not a string: context"):
        read_unlabeled(squad, records)


@pytest.mark.slow
def test_real_mrpc_train_split_without_labels_prunes_as_the_labelled_split(shared_dir, tmp_path):
    """MiniLM-MRPC, a 2,000-token sample of the shared MRPC train split, as a tab-separated text
    file and as the labelled parquet: K-prune keeps the same heads and neurons."""
    import pyarrow.parquet as pq

    data = shared_dir / "data" / "glue" / "mrpc"
    train = pq.read_table(data / "train").to_pylist()
    source = tmp_path / "mrpc-unlabeled.txt"
    source.write_text("".join(f"{row['sentence1']}\t{row['sentence2']}\n" for row in train))
    common = ["run", "task=mrpc", f"model.path={shared_dir / 'models' / 'minilm-mrpc'}", f"data_dir={data}",
              "calibration.num_tokens=2000", "eval_max_examples=32", "device=cpu"]
    assert kprune(*common, f"output_dir={tmp_path / 'labelled'}") == 0
    assert kprune(*common, f"output_dir={tmp_path / 'unlabeled'}", f"calibration.source={source}") == 0
    labelled, unlabeled = (json.loads((tmp_path / name / "report.json").read_text())
                           for name in ("labelled", "unlabeled"))
    assert unlabeled["sample"] == labelled["sample"] and unlabeled["layers"] == labelled["layers"]
