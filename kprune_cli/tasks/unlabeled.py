"""Unlabeled in-domain text as a calibration source (``calibration.source=PATH``).

Two formats, told apart by the suffix:

- ``.jsonl``: one JSON object per line with the task's input columns (``task.text_keys``: e.g.
  ``sentence``, or ``sentence1`` and ``sentence2``; ``question`` and ``context`` for SQuAD);
  other fields, a label among them, are ignored.
- anything else: plain UTF-8 text, one example per line; for a task of text pairs, the two texts
  separated by a tab. Blank lines are skipped.

K-prune reads no gold labels, so such a sample prunes exactly as the same rows of a labelled
split would (``tests/test_unlabeled.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset

from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.kinds import kind_of
from kprune_cli.tasks.spec import TaskSpec

JSONL_SUFFIX = ".jsonl"


def read_unlabeled(task: TaskSpec, path: str | Path) -> Dataset:
    """The rows of ``path`` with the columns ``task.text_keys`` (plus an ``id`` per row for a QA
    task, which groups a question's windows); a :class:`UserError` names a bad line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration.source={str(path)!r} is not a file: give a text or .jsonl file")
    reader = _jsonl_row if path.suffix.lower() == JSONL_SUFFIX else _text_row
    rows = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                rows.append(reader(task, line.rstrip("\r\n"), f"{path}:{number}"))
    if not rows:
        raise UserError(f"calibration.source={str(path)!r} holds no examples: give one per line")
    return _dataset(task, rows)


def rows_from_texts(task: TaskSpec, texts: Sequence[str]) -> Dataset:
    """The rows of ``texts``, one example each, as a line of a plain text file gives them (a task of
    text pairs takes the two texts separated by a tab); a :class:`UserError` names a bad one."""
    rows = [_text_row(task, text, f"calibration text {index}") for index, text in enumerate(texts) if text.strip()]
    if not rows:
        raise UserError("the calibration texts hold no examples: give a list of non-empty strings")
    return _dataset(task, rows)


def _dataset(task: TaskSpec, rows: list[dict[str, str]]) -> Dataset:
    """``rows`` as a dataset, completed by the task's kind (QA: an ``id`` per row, which groups a
    question's windows)."""
    return Dataset.from_list(kind_of(task).unlabeled_rows(rows))


def _text_row(task: TaskSpec, line: str, where: str) -> dict[str, str]:
    """One example of a plain text line: the whole line, or a pair split at its tab."""
    keys = kind_of(task).unlabeled_keys(task)
    if len(keys) == 1:
        return {keys[0]: line}
    texts = line.split("\t")
    if len(texts) != len(keys):
        raise UserError(f"{where}: task {task.name} takes {' and '.join(keys)} separated by one tab, "
                        f"this line has {len(texts) - 1} tabs")
    return dict(zip(keys, texts))


def _jsonl_row(task: TaskSpec, line: str, where: str) -> dict[str, str]:
    """The task's input columns of one JSON line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: not a JSON object ({error})") from None
    keys = kind_of(task).unlabeled_keys(task)
    missing = [key for key in keys if not isinstance(record, dict) or not isinstance(record.get(key), str)]
    if missing:
        raise UserError(f"{where}: task {task.name} needs text field(s) {', '.join(keys)}; "
                        f"missing or not a string: {', '.join(missing)}")
    return {key: record[key] for key in keys}
