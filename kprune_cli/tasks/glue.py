"""GLUE-style tasks (single sentences or pairs with a label): tokenisation."""

from __future__ import annotations

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from kprune_cli.tasks.spec import TaskSpec


def tokenize_glue(task: TaskSpec, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int,
                  label_type: type) -> Dataset:
    """One feature per row: the ``task.text_keys`` texts (one or a pair) truncated to
    ``max_length`` tokens, unpadded, plus ``labels`` (of ``label_type``: ``int`` class ids,
    ``float`` regression scores) where the rows have them (an unlabeled calibration source has none).

    Features: ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer
    makes them), ``labels``.
    """
    labelled = task.label_key in dataset.column_names

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(*(batch[key] for key in task.text_keys), truncation=True, max_length=max_length)
        if labelled:
            encoded["labels"] = [label_type(label) for label in batch[task.label_key]]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenize")
