"""Task data: load the splits (hub or local files) and tokenise them (batches: :mod:`kprune_cli.tasks.batches`).

Local layouts accepted by :func:`load_task_data` for a split ``<split>`` (e.g. ``train``,
``validation``, ``validation_matched``; ``dev`` may stand for ``validation``):

- ``<dir>/<split>/*.{parquet,jsonl,json,csv,tsv}``  (the HF GLUE parquet layout)
- ``<dir>/<split>.{parquet,jsonl,json,csv,tsv}``
- ``<dir>/<split>-*.{parquet,...}``                 (HF shards, e.g. ``train-00000-of-00001.parquet``)
- SQuAD: the official ``train-v1.1.json`` / ``dev-v1.1.json`` (``-v2.0`` for ``squad_v2``),
  or any ``.json`` of the layouts above, flattened to the HF ``squad`` columns.

TSV files are read without quoting (as GLUE's own TSVs need); the other formats need the
columns of the HF dataset: ``task.text_keys`` and ``task.label_key`` (``id``, ``title``,
``context``, ``question``, ``answers`` for SQuAD).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from datasets import Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError
from transformers import PreTrainedTokenizerBase

from kprune_cli.runtime.errors import UserError
from kprune_cli.runtime.interrupts import deferred_interrupts
from kprune_cli.tasks.kinds import kind_of
from kprune_cli.tasks.spec import TaskSpec

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
TARGET_KEYS = ("labels", "start_positions", "end_positions")
_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv"}
_LAYOUTS = "<dir>/<split>/*.ext, <dir>/<split>.ext or <dir>/<split>-*.ext with ext in parquet, jsonl, json, csv, tsv"


class TaskData(DatasetDict):
    """The splits of a task, plus ``notes``: what the report must say about where they came from
    (e.g. that a single SQuAD file was split by article)."""

    def __init__(self, splits: dict[str, Dataset], notes: Sequence[str] = ()):
        super().__init__(splits)
        self.notes = list(notes)


@deferred_interrupts()  # datasets' fingerprinting would swallow Ctrl-C
def load_task_data(task: TaskSpec, data_dir: str | Path | None = None,
                   data_files: dict[str, str | list[str]] | None = None, *,
                   splits: Sequence[str] | None = None, first_articles: int | None = None) -> TaskData:
    """The splits ``splits`` (default: ``task.train_split`` and ``task.eval_splits``) of ``task``.

    Without ``data_dir`` and ``data_files`` the data comes from the Hugging Face hub
    (``load_dataset(task.hub_path, task.hub_name)``). ``data_dir`` is a local directory in
    one of the layouts of this module's docstring; ``data_files`` maps split names to
    files (relative to the working directory).

    SQuAD with one file only (e.g. ``dev-v1.1.json`` without a train file): that file is
    split by article with :func:`~kprune_cli.tasks.squad.split_squad_by_article`, articles
    ``[0, first_articles)`` (default: the first half) becoming the train split and the
    rest the evaluation split, whichever splits are asked for, so that evaluation always
    sees the same held-out articles; ``notes`` says so.

    Raises :class:`UserError` for an unreachable hub, a missing directory or file, a split
    without files, an empty split, or missing columns.
    """
    known = (task.train_split, *task.eval_splits)
    wanted = tuple(splits) if splits is not None else known
    unknown = [split for split in wanted if split not in known]
    if unknown:
        raise UserError(f"split {unknown[0]!r} is not a split of task {task.name}: choose from {', '.join(known)}")
    if data_dir is not None and data_files is not None:
        raise UserError("give data_dir or data_files, not both")
    if data_dir is None and data_files is None:
        data = TaskData(_load_from_hub(task, wanted))
    else:
        files = _find_files(task, Path(data_dir)) if data_dir is not None else _given_files(task, data_files)
        data = _load_local(task, files, wanted, first_articles)
    for split, dataset in data.items():
        _check_split(task, split, dataset)
    return data


def _load_from_hub(task: TaskSpec, wanted: Sequence[str]) -> dict[str, Dataset]:
    name = task.hub_path + (f"/{task.hub_name}" if task.hub_name else "")
    try:
        loaded = load_dataset(task.hub_path, task.hub_name)
    except OSError as error:  # ConnectionError, offline mode, dataset not found
        raise UserError(f"cannot load task {task.name!r} ({name}) from the Hugging Face hub ({error}): "
                        f"the hub is unreachable; pass data_dir=<local directory> instead") from None
    missing = [split for split in wanted if split not in loaded]
    if missing:
        raise UserError(f"hub dataset {name} has no split {missing[0]!r}; it has {', '.join(loaded)}")
    return {split: loaded[split] for split in wanted}


def _find_files(task: TaskSpec, root: Path) -> dict[str, list[Path]]:
    """The files of every split of ``task`` found under ``root`` (splits without files left out)."""
    if not root.is_dir():
        raise UserError(f"data_dir={str(root)!r} is not a directory; expected one with {_LAYOUTS}")
    found = {}
    for split in (task.train_split, *task.eval_splits):
        for name in dict.fromkeys((split, split.replace("validation", "dev"))):
            files = _files_named(task, root, name)
            if files:
                found[split] = files
                break
    return found


def _files_named(task: TaskSpec, root: Path, name: str) -> list[Path]:
    """The first layout that has files for split ``name``: the kind's own (official SQuAD), folder, file, shards."""
    official = kind_of(task).official_files(task, root, name)
    if official:
        return official
    for pattern in (f"{name}/*", f"{name}", f"{name}-*"):
        for suffix in _BUILDERS:
            files = sorted(path for path in root.glob(pattern + suffix) if path.is_file())
            if files:
                return files
    return []


def _given_files(task: TaskSpec, data_files: dict[str, str | list[str]]) -> dict[str, list[Path]]:
    known = (task.train_split, *task.eval_splits)
    files = {}
    for split, paths in data_files.items():
        if split not in known:
            raise UserError(f"data_files has split {split!r}; task {task.name} has splits {', '.join(known)}")
        files[split] = [Path(path) for path in ([paths] if isinstance(paths, str) else paths)]
        for path in files[split]:
            if not path.is_file():
                raise UserError(f"data file {str(path)!r} for split {split!r} does not exist")
    return files


def _load_local(task: TaskSpec, files: dict[str, list[Path]], wanted: Sequence[str],
                first_articles: int | None) -> TaskData:
    only_file = len(files) == 1 and len(task.eval_splits) == 1 and task.eval_splits[0] in files
    if kind_of(task).splits_single_file and task.train_split not in files and only_file:
        return _split_single_file(task, files[task.eval_splits[0]], wanted, first_articles)
    missing = [split for split in wanted if split not in files]
    if missing:
        raise UserError(f"no data files for split {missing[0]!r}; expected {_LAYOUTS}")
    return TaskData({split: _read_split(task, split, files[split]) for split in wanted})


def _split_single_file(task: TaskSpec, paths: list[Path], wanted: Sequence[str],
                       first_articles: int | None) -> TaskData:
    """Train and evaluation splits made from one file by the task's kind (SQuAD: by article)."""
    source = ", ".join(str(path) for path in paths)
    splits, note = kind_of(task).split_single_file(task, _read_split(task, task.eval_splits[0], paths),
                                                   first_articles, source)
    return TaskData({split: splits[split] for split in wanted}, notes=[note])


def _read_split(task: TaskSpec, split: str, paths: list[Path]) -> Dataset:
    suffixes = {path.suffix.lower() for path in paths}
    if len(suffixes) > 1 or not suffixes <= set(_BUILDERS):
        raise UserError(f"data files {', '.join(map(str, paths))}: expected files of one type, "
                        f"one of {', '.join(_BUILDERS)}")
    suffix = suffixes.pop()
    if suffix == ".json" and (own := kind_of(task).read_json(paths)) is not None:
        return own
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
    try:
        if all(_has_no_rows(path) for path in paths):  # the builders fail obscurely on these
            raise UserError(f"split {split!r} of task {task.name} is empty: {', '.join(map(str, paths))} hold no rows")
        return load_dataset(_BUILDERS[suffix], data_files=[str(path) for path in paths], split="train", **options)
    except (DatasetGenerationError, OSError, ValueError) as error:
        raise UserError(f"cannot read {', '.join(map(str, paths))}: {error.__cause__ or error}") from None


def _has_no_rows(path: Path) -> bool:
    if path.suffix.lower() == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows == 0
    header_lines = 1 if path.suffix.lower() in (".csv", ".tsv") else 0
    with path.open(encoding="utf-8", errors="replace") as lines:
        return len(list(islice(filter(str.strip, lines), header_lines + 1))) <= header_lines


def _check_split(task: TaskSpec, split: str, dataset: Dataset) -> None:
    required = kind_of(task).required_columns(task, split)
    missing = [column for column in dict.fromkeys(required) if column not in dataset.column_names]
    if missing:
        raise UserError(f"split {split!r} of task {task.name} lacks column(s) {', '.join(missing)}: "
                        f"it has {', '.join(dataset.column_names)}; needed: {', '.join(dict.fromkeys(required))}")
    if len(dataset) == 0:
        raise UserError(f"split {split!r} of task {task.name} is empty")


@deferred_interrupts()
def tokenize_split(task: TaskSpec, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, *,
                   for_training: bool) -> Dataset:
    """Unpadded model features of ``dataset`` (batched by :class:`~kprune_cli.tasks.batches.FeatureBatches`).

    The task's kind tokenises (:meth:`~kprune_cli.tasks.kinds.base.TaskKind.tokenize`), at most
    :func:`sequence_limit` tokens per feature. GLUE: one feature per row
    (:func:`~kprune_cli.tasks.glue.tokenize_glue`) with ``labels``. SQuAD: windows overlapping by
    ``task.extra["doc_stride"]`` (default 128; :func:`~kprune_cli.tasks.squad.tokenize_squad`), each
    with the ``example_id`` of its question; ``start_positions`` / ``end_positions`` when
    ``for_training``, else ``offset_mapping`` for :func:`~kprune_cli.tasks.squad.postprocess_predictions`.
    """
    return kind_of(task).tokenize(task, dataset, tokenizer, sequence_limit(task, tokenizer), for_training)


@deferred_interrupts()
def evaluation_features(task: TaskSpec, dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """Unpadded model features of an evaluation split, as the task's kind evaluates them: those of
    :func:`tokenize_split` without training targets, or a layout of the kind's own (retrieval: the
    questions, then the distinct paragraphs)."""
    return kind_of(task).evaluation_features(task, dataset, tokenizer, sequence_limit(task, tokenizer))


def sequence_limit(task: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens per sequence: ``task.max_length``, or the model's limit where that is shorter
    (:func:`~kprune_cli.models.loading.load_model` sets ``tokenizer.model_max_length`` to it)."""
    return min(task.max_length, tokenizer.model_max_length)


def feature_lengths(features: Dataset) -> np.ndarray:
    """``(features,)`` unpadded token counts, read from Arrow without building Python lists."""
    column = features.select_columns(["input_ids"]).with_format("arrow")["input_ids"]
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
