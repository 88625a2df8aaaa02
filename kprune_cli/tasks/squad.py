"""SQuAD: official JSON files, the split by article, tokenised features and answer decoding.

Features follow the usual Hugging Face recipe: question and context are tokenised as a
pair (question first), the context is cut into windows of ``max_length`` tokens that overlap by
``doc_stride`` tokens, so one question may give several features. Decoding goes back
from the start/end logits of all features of a question to a span of its context.
[CLS] (``<s>`` for RoBERTa) is the first token for every supported model family; it is
the target of an answer that is not inside a window and the "no answer" of SQuAD v2.0.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, List, Value
from transformers import PreTrainedTokenizerBase

from kprune_cli.runtime.errors import UserError

CLS_INDEX = 0
DOC_STRIDE = 128
N_BEST = 20
MAX_ANSWER_LENGTH = 30

SQUAD_FEATURES = Features({
    "id": Value("string"),
    "title": Value("string"),
    "context": Value("string"),
    "question": Value("string"),
    "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
})


def read_squad_json(path: str | Path) -> Dataset:
    """One row per question of an official SQuAD JSON file, with the columns of HF ``squad``.

    Accepts the official layout (``{"version": ..., "data": [articles]}``, v1.1 or v2.0;
    unanswerable v2.0 questions get empty ``answers``) and a JSON list of flat rows.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read SQuAD JSON {path}: {error}") from None
    if isinstance(content, list):
        rows = content
    elif isinstance(content, dict) and isinstance(content.get("data"), list):
        rows = [
            {
                "id": qa["id"],
                "title": article.get("title", ""),
                "context": paragraph["context"],
                "question": qa["question"],
                "answers": {
                    "text": [answer["text"] for answer in qa.get("answers", [])],
                    "answer_start": [answer["answer_start"] for answer in qa.get("answers", [])],
                },
            }
            for article in content["data"]
            for paragraph in article["paragraphs"]
            for qa in paragraph["qas"]
        ]
    else:
        raise UserError(f"{path} is not a SQuAD file: expected {{'data': [articles]}} or a list of rows")
    try:
        return Dataset.from_list(rows, features=SQUAD_FEATURES)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: rows must have id, title, context, question, answers ({error})") from None


def split_squad_by_article(dataset: Dataset, first_articles: int) -> DatasetDict:
    """``train`` = the questions of articles ``[0, first_articles)``, ``validation`` = the rest.

    Articles are told apart by ``title``, in order of first appearance. Used when only one
    SQuAD file (e.g. the dev set) is available, so that calibration data and evaluation
    data never share an article.
    """
    if "title" not in dataset.column_names:
        raise UserError("cannot split SQuAD by article: the data has no 'title' column")
    titles = dataset["title"]
    order = list(dict.fromkeys(titles))
    if not 0 < first_articles < len(order):
        raise UserError(f"first_articles={first_articles}: must be between 1 and {len(order) - 1} "
                        f"(the data has {len(order)} articles)")
    head = set(order[:first_articles])
    in_head = [title in head for title in titles]
    return DatasetDict({
        "train": dataset.select([i for i, keep in enumerate(in_head) if keep]),
        "validation": dataset.select([i for i, keep in enumerate(in_head) if not keep]),
    })


def tokenize_squad(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, *,
                   for_training: bool, doc_stride: int = DOC_STRIDE) -> Dataset:
    """Question/context windows of at most ``max_length`` tokens, overlapping by ``doc_stride``.

    Every feature keeps ``example_id`` (the question's ``id``; the features of one question
    are consecutive). Training features get ``start_positions`` / ``end_positions``: the
    tokens of the first gold answer, or :data:`CLS_INDEX` when the window does not contain
    it (or the question has none). Evaluation features get ``offset_mapping``: per token
    its ``(start, end)`` characters in the context, ``None`` outside the context.
    """
    if not tokenizer.is_fast:
        raise UserError(f"SQuAD needs a fast tokenizer (offset mappings); {type(tokenizer).__name__} is not")

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(
            [question.lstrip() for question in batch["question"]],
            batch["context"],
            truncation="only_second",
            max_length=max_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        sample_map = encoded.pop("overflow_to_sample_mapping")
        offsets = encoded.pop("offset_mapping")
        encoded["example_id"] = [batch["id"][sample] for sample in sample_map]
        if for_training:
            positions = [_answer_tokens(batch["answers"][sample], offsets[i], encoded.sequence_ids(i))
                         for i, sample in enumerate(sample_map)]
            encoded["start_positions"] = [start for start, _ in positions]
            encoded["end_positions"] = [end for _, end in positions]
        else:
            encoded["offset_mapping"] = [
                [offset if sequence_id == 1 else None
                 for offset, sequence_id in zip(offsets[i], encoded.sequence_ids(i))]
                for i in range(len(sample_map))
            ]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenize")


def _answer_tokens(answers: dict[str, list], offsets: list[tuple[int, int]],
                   sequence_ids: list[int | None]) -> tuple[int, int]:
    """First and last token of the first gold answer in this window, or (CLS, CLS)."""
    if not answers["text"]:
        return CLS_INDEX, CLS_INDEX
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    context_tokens = [i for i, sequence_id in enumerate(sequence_ids) if sequence_id == 1]
    first, last = context_tokens[0], context_tokens[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return CLS_INDEX, CLS_INDEX
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def postprocess_predictions(examples: Dataset, features: Dataset, start_logits: Sequence[np.ndarray],
                            end_logits: Sequence[np.ndarray], *, version_2: bool = False,
                            null_threshold: float = 0.0, n_best: int = N_BEST,
                            max_answer_length: int = MAX_ANSWER_LENGTH) -> dict[str, str]:
    """The answer text of every example, from the logits of all its features.

    ``start_logits[i]`` / ``end_logits[i]`` are ``(tokens_i,)`` arrays of feature i (padding
    removed), ``features`` as made by :func:`tokenize_squad` with ``for_training=False``.
    Per feature the ``n_best`` highest start and end logits are paired; spans outside the
    context, reversed, or longer than ``max_answer_length`` tokens are skipped, and the
    span with the highest start + end logit over all features wins. SQuAD v2.0 (as the
    official scripts): the answer is empty when the null score (start + end logit of
    [CLS], minimum over the features) exceeds the best span's score by more than
    ``null_threshold``. A question without any valid span gets the empty answer.
    """
    contexts = dict(zip(examples["id"], examples["context"]))
    predictions = {}
    rows = features.select_columns(["example_id", "offset_mapping"])
    runs = groupby(enumerate(rows), key=lambda item: item[1]["example_id"])
    for example_id, run in runs:  # the features of one question are consecutive
        best_score, best_text, null_score = -np.inf, "", np.inf
        for index, row in run:
            offsets = row["offset_mapping"]
            starts, ends = start_logits[index][:len(offsets)], end_logits[index][:len(offsets)]
            null_score = min(null_score, float(starts[CLS_INDEX] + ends[CLS_INDEX]))
            best_ends = np.argsort(ends)[::-1][:n_best]
            for start in np.argsort(starts)[::-1][:n_best]:
                for end in best_ends:
                    if offsets[start] is None or offsets[end] is None or not 0 <= end - start < max_answer_length:
                        continue
                    score = float(starts[start] + ends[end])
                    if score > best_score:
                        best_score, best_text = score, contexts[example_id][offsets[start][0]:offsets[end][1]]
        if version_2 and null_score - best_score > null_threshold:
            best_text = ""
        predictions[example_id] = best_text
    return predictions
