"""Task metrics of a model on the evaluation splits, and the measured average sequence length."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from rich.markup import escape
from rich.progress import Progress
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kprune_cli.models.precision import autocast_forward
from kprune_cli.runtime.console import console, make_progress
from kprune_cli.tasks.batches import FeatureBatches
from kprune_cli.tasks.data import MODEL_INPUT_KEYS, evaluation_features, feature_lengths
from kprune_cli.tasks.kinds import kind_of
from kprune_cli.tasks.spec import TaskSpec

# Metric-name prefixes of the evaluation splits after the first (MNLI's mismatched dev set).
SPLIT_PREFIXES = {"validation_mismatched": "mm_"}


@dataclass
class BatchSize:
    """The evaluation batch size: halved whenever a batch runs out of GPU memory, each time with a
    line in ``notes`` (for the report) and on the console."""

    size: int
    notes: list[str] = field(default_factory=list)

    def halve(self, failed: int, where: str) -> None:
        """A batch of ``failed`` sequences ran out of memory ``where``: use half as many from now on."""
        self.size = max(1, failed // 2)
        self.notes.append(f"{where} with batch size {failed} ran out of GPU memory: "
                          f"evaluation batch size lowered to {self.size}")
        console.print(f"[yellow]note:[/] {escape(self.notes[-1])}", highlight=False, soft_wrap=True)
        torch.cuda.empty_cache()


def evaluate_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: TaskSpec,
                   datasets: DatasetDict, device: torch.device | str, batch_size: int = 64,
                   progress: Progress | None = None, notes: list[str] | None = None,
                   max_examples: int | None = None, dtype: torch.dtype | None = None) -> dict[str, float]:
    """Every metric of ``task`` on every split of ``task.eval_splits``, as fractions.

    The first split's metrics keep their plain names (``{"accuracy": 0.87, "f1": 0.9}``);
    later splits' names get a prefix (MNLI mismatched: ``mm_accuracy``). ``progress``: a
    rich progress display to add the bars to; by default a transient one of our own.
    A batch that runs out of GPU memory is retried in halves (the metrics do not change);
    ``notes`` (optional) gets a line for the report each time. ``max_examples``: evaluate on
    the first that many examples of each split only (a quick check, not a result). ``dtype``
    (``torch.bfloat16`` or ``torch.float16``; ``eval_dtype``): the forward passes run under autocast
    in it (:func:`~kprune_cli.models.precision.autocast_forward`), the weights stay float32 and the
    outputs come back float32; None: float32.
    """
    metrics = {}
    sizes = BatchSize(batch_size, notes if notes is not None else [])
    with _progress_display(progress) as display, autocast_forward(model, dtype):
        for position, split in enumerate(task.eval_splits):
            prefix = "" if position == 0 else SPLIT_PREFIXES.get(split, f"{split}_")
            scores = evaluate_split(model, tokenizer, task, first_examples(datasets[split], max_examples), device,
                                    sizes, display, split)
            metrics.update({prefix + name: value for name, value in scores.items()})
    return metrics


def first_examples(dataset: Dataset, max_examples: int | None) -> Dataset:
    """The first ``max_examples`` rows of ``dataset`` (all of them for None)."""
    if max_examples is None or max_examples >= len(dataset):
        return dataset
    return dataset.select(range(max_examples))


def capped_evaluation_note(task: TaskSpec, datasets: DatasetDict, max_examples: int | None) -> list[str]:
    """The report's note when ``eval_max_examples`` leaves out examples of an evaluation split."""
    cut = [f"{split} {max_examples} of {len(datasets[split])}" for split in task.eval_splits
           if max_examples is not None and max_examples < len(datasets[split])]
    return [f"evaluated on the first examples of each split only (eval_max_examples={max_examples}: "
            f"{', '.join(cut)}): the metrics are a quick check, not a result"] if cut else []


def evaluate_split(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: TaskSpec,
                   dataset: Dataset, device: torch.device | str, batch_size: BatchSize, progress: Progress,
                   description: str) -> dict[str, float]:
    """The metrics of ``task`` on one split (rows with gold labels / answers), as its kind computes them
    (:meth:`~kprune_cli.tasks.kinds.base.TaskKind.evaluate`)."""
    kind = kind_of(task)
    features = evaluation_features(task, dataset, tokenizer)

    def run(output_names: tuple[str, ...]) -> dict[str, list[np.ndarray]]:
        return predict(model, tokenizer, features, output_names, device, batch_size, progress, description,
                       token_outputs=kind.token_outputs)

    return kind.evaluate(task, dataset, features, run)


def predict(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, features: Dataset,
            output_names: tuple[str, ...], device: torch.device | str, batch_size: BatchSize,
            progress: Progress, description: str, token_outputs: tuple[str, ...] = ()) -> dict[str, list[np.ndarray]]:
    """The model's outputs ``output_names`` for every feature, in the order of ``features``.

    Batches are sorted by length (longest first) to cut padding; each output comes back
    as one float32 array per feature: ``(num_labels,)`` for ``logits``, ``(tokens,)``
    (padding removed) for the ``token_outputs`` with one value per token (QA's ``start_logits`` /
    ``end_logits``). A batch of more than one feature that runs out of GPU memory is retried with
    ``batch_size`` halved. Batches are gathered from the features' Arrow columns
    (:class:`~kprune_cli.tasks.batches.FeatureBatches`), in page-locked memory for a GPU, and copied
    asynchronously. The outputs stay on ``device`` until the split is done and are copied to the host
    once (no sync per batch on a GPU).
    """
    inputs = features.select_columns([key for key in MODEL_INPUT_KEYS if key in features.column_names])
    batches = FeatureBatches(inputs, tokenizer, pin_memory=torch.device(device).type == "cuda")
    order = np.argsort(-batches.lengths, kind="stable")
    done: list[tuple[np.ndarray, list[int]]] = []  # per batch: its features' indices and real lengths
    results: dict[str, list[torch.Tensor]] = {name: [] for name in output_names}  # per batch, on ``device``
    bar = progress.add_task(description, total=len(order))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            begin = 0
            while begin < len(order):
                indices = order[begin:begin + batch_size.size]
                batch = batches.batch(indices)
                result = _forward(model, batch, device, retry=len(indices) > 1)
                if result is None:
                    batch_size.halve(len(indices), f"evaluating {description}")
                    continue
                done.append((indices, batch["attention_mask"].sum(dim=1).tolist()))
                for name in output_names:
                    results[name].append(result[name])  # (batch, num_labels) or (batch, seq)
                progress.advance(bar, len(indices))
                begin += len(indices)
    finally:
        model.train(was_training)
    outputs = {name: [None] * len(inputs) for name in output_names}
    for name, tensors in results.items():
        for (indices, lengths), values in zip(done, _to_host(tensors)):
            for row, index in enumerate(indices):
                outputs[name][index] = values[row, :lengths[row]] if name in token_outputs else values[row]
    return outputs


def _to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """``tensors`` (per batch, ``(batch, ...)``, on one device; the last dimension may differ between
    batches) as float32 arrays, copied to the host in one transfer; padding added along the last
    dimension is cut off again."""
    if not tensors:
        return []
    width = max(tensor.shape[-1] for tensor in tensors)
    joined = torch.cat([torch.nn.functional.pad(tensor.float(), (0, width - tensor.shape[-1])) for tensor in tensors])
    host = joined.cpu().numpy()
    pieces, begin = [], 0
    for tensor in tensors:
        pieces.append(host[begin:begin + tensor.shape[0], ..., :tensor.shape[-1]])
        begin += tensor.shape[0]
    return pieces


def _forward(model: PreTrainedModel, batch: dict[str, torch.Tensor], device: torch.device | str,
             retry: bool) -> dict[str, torch.Tensor] | None:
    """The model's outputs on ``batch``; None if it ran out of GPU memory and ``retry`` (a smaller
    batch may fit). Returning, rather than handling it in an ``except`` block, frees the failed
    pass's tensors before the retry."""
    try:
        return model(**{key: value.to(device, non_blocking=True) for key, value in batch.items()})
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError needs torch >= 2.5
        if not retry:
            raise
    return None


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
    return float(feature_lengths(evaluation_features(task, dataset, tokenizer)).mean())
