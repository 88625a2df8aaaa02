"""Task metrics of a model on the evaluation splits, and the measured average sequence length."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from rich.progress import Progress
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kprune_cli.console import make_progress
from kprune_cli.tasks.data import MODEL_INPUT_KEYS, collate, feature_lengths, tokenize_split
from kprune_cli.tasks.metrics import compute_metrics
from kprune_cli.tasks.spec import TaskSpec
from kprune_cli.tasks.squad import postprocess_predictions

# Metric-name prefixes of the evaluation splits after the first (MNLI's mismatched dev set).
SPLIT_PREFIXES = {"validation_mismatched": "mm_"}
# Model outputs with one value per token (the others have one row per sequence).
TOKEN_OUTPUTS = ("start_logits", "end_logits")


def evaluate_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: TaskSpec,
                   datasets: DatasetDict, device: torch.device | str, batch_size: int = 64,
                   progress: Progress | None = None) -> dict[str, float]:
    """Every metric of ``task`` on every split of ``task.eval_splits``, as fractions.

    The first split's metrics keep their plain names (``{"accuracy": 0.87, "f1": 0.9}``);
    later splits' names get a prefix (MNLI mismatched: ``mm_accuracy``). ``progress``: a
    rich progress display to add the bars to; by default a transient one of our own.
    """
    metrics = {}
    with _progress_display(progress) as display:
        for position, split in enumerate(task.eval_splits):
            prefix = "" if position == 0 else SPLIT_PREFIXES.get(split, f"{split}_")
            scores = evaluate_split(model, tokenizer, task, datasets[split], device, batch_size, display, split)
            metrics.update({prefix + name: value for name, value in scores.items()})
    return metrics


def evaluate_split(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: TaskSpec,
                   dataset: Dataset, device: torch.device | str, batch_size: int, progress: Progress,
                   description: str) -> dict[str, float]:
    """The metrics of ``task`` on one split (rows with gold labels / answers)."""
    features = tokenize_split(task, dataset, tokenizer, for_training=False)
    if task.is_qa:
        outputs = predict(model, tokenizer, features, TOKEN_OUTPUTS, device, batch_size,
                          progress, description)
        answers = postprocess_predictions(dataset, features, outputs["start_logits"], outputs["end_logits"],
                                          version_2=task.extra.get("version_2_with_negative", False))
        predictions = [answers[example_id] for example_id in dataset["id"]]
        references = [answer["text"] for answer in dataset["answers"]]
    else:
        logits = np.stack(predict(model, tokenizer, features, ("logits",), device, batch_size,
                                  progress, description)["logits"])  # (examples, num_labels)
        predictions = logits[:, 0] if task.kind == "regression" else logits.argmax(axis=-1)
        references = dataset[task.label_key]
    return compute_metrics(task, predictions, references)


def predict(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, features: Dataset,
            output_names: tuple[str, ...], device: torch.device | str, batch_size: int,
            progress: Progress, description: str) -> dict[str, list[np.ndarray]]:
    """The model's outputs ``output_names`` for every feature, in the order of ``features``.

    Batches are sorted by length (longest first) to cut padding; each output comes back
    as one float32 array per feature: ``(num_labels,)`` for ``logits``, ``(tokens,)``
    (padding removed) for the token-level ``start_logits`` / ``end_logits``.
    """
    inputs = features.select_columns([key for key in MODEL_INPUT_KEYS if key in features.column_names])
    order = np.argsort(-feature_lengths(inputs), kind="stable")
    outputs = {name: [None] * len(inputs) for name in output_names}
    bar = progress.add_task(description, total=len(order))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for begin in range(0, len(order), batch_size):
                indices = order[begin:begin + batch_size]
                batch = collate(inputs.select(indices).to_list(), tokenizer)
                lengths = batch["attention_mask"].sum(dim=1).tolist()
                result = model(**{key: value.to(device) for key, value in batch.items()})
                for name in output_names:
                    values = result[name].float().cpu().numpy()  # (batch, num_labels) or (batch, seq)
                    for row, index in enumerate(indices):
                        outputs[name][index] = values[row, :lengths[row]] if name in TOKEN_OUTPUTS else values[row]
                progress.advance(bar, len(indices))
    finally:
        model.train(was_training)
    return outputs


@contextmanager
def _progress_display(progress: Progress | None) -> Iterator[Progress]:
    if progress is not None:
        yield progress
        return
    with make_progress() as own:
        yield own


def measure_avg_seq_len(task: TaskSpec, dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> float:
    """Average tokens per feature of ``dataset`` (the evaluation split), special tokens
    included, truncated at :func:`~kprune_cli.tasks.data.sequence_limit`: the FLOPs model's S for tasks without a
    published value (``task.avg_seq_len is None``)."""
    return float(feature_lengths(tokenize_split(task, dataset, tokenizer, for_training=False)).mean())
