"""Sentence embeddings: a bare encoder (no task head) whose pooled, optionally normalised, token states
are the prediction, as sentence-transformers computes them.

**Pooling** is read from the model's sentence-transformers files (:func:`read_pooling`):
``modules.json`` lists a ``Transformer`` (this encoder), a ``Pooling`` (its ``config.json``: one of
``cls``, ``mean``, ``max``, ``mean_sqrt_len_tokens``) and optionally ``Normalize`` (unit length). A plain
``transformers`` folder without ``modules.json`` gets **mean pooling without normalisation** (what
sentence-transformers itself builds for such a folder). Other modules (``Dense``, ...) are refused.
Texts are truncated at the folder's ``sentence_bert_config.json`` ``max_seq_length`` where it has one
(and at the task's ``max_length``), as sentence-transformers truncates them.
The pooled embedding is added to the encoder's outputs as ``sentence_embedding`` ``(batch, d)`` by a
forward hook (:func:`attach_pooling`), so every caller of ``model(**inputs)`` sees it.

**Labels are never read**: a calibration row is texts only, and each text (each sentence of a pair)
is its own sequence, since an embedding model encodes one sentence at a time.

**Predictive knowledge** (K-prune) is distilled from the dense model's embeddings with
:data:`EMBEDDING_LOSS`: ``1 − cos(e_student, e_teacher)`` per sentence. It is per-sample, as K-prune's
per-sample gradients need (an in-batch similarity distribution would tie a sentence's loss to the
others of its micro-batch), and zero with zero gradient at the dense model, as the KL of a
classifier is.

**Evaluation** of a pair task (``stsb_embed``): the cosine similarity of the two sentences' embeddings
against the gold score (Spearman and Pearson correlation, as sentence-transformers'
``EmbeddingSimilarityEvaluator``; fractions, not ×100).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.kinds.base import GLUE_GRADIENT_BATCH, Predict, TaskKind
from kprune_cli.tasks.metrics import label_metrics
from kprune_cli.tasks.spec import TaskSpec

EMBEDDING_OUTPUT = "sentence_embedding"
"""The model output (added by :func:`attach_pooling`) holding the pooled embedding ``(batch, d)``."""
EMBEDDING_LOSS = "1 - cosine"
"""The embedding-distillation loss: ``1 − cos(student embedding, teacher embedding)`` per sentence."""
POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens")
MODULES_FILE = "modules.json"
POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"
SENTENCE_CONFIG = "sentence_bert_config.json"
COPIED_FILES = (SENTENCE_CONFIG, "config_sentence_transformers.json")
"""sentence-transformers files copied as they are from the source folder to a pruned checkpoint."""
_LEGACY_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
_MODULE_NAMES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class Pooling:
    """How token states become a sentence embedding: ``mode`` (one of :data:`POOLING_MODES`), then unit
    length if ``normalize``; ``source``: the sentence-transformers folder it was read from (None: the
    default for a plain folder)."""

    mode: str = "mean"
    normalize: bool = False
    source: str | None = None

    def __call__(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(batch, d)`` embeddings of ``hidden`` ``(batch, seq, d)`` over the real tokens of ``attention_mask``
        ``(batch, seq)`` (right padding), computed as sentence-transformers' ``Pooling`` does."""
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
        if self.mode == "cls":
            pooled = hidden[:, 0]
        elif self.mode == "max":
            pooled = hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
        else:
            counts = torch.clamp(mask.sum(dim=1), min=1e-9)  # (batch, 1)
            pooled = (hidden * mask).sum(dim=1) / (counts if self.mode == "mean" else torch.sqrt(counts))
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled


def read_pooling(location: str | Path) -> Pooling:
    """The pooling of the model folder ``location``: from its ``modules.json`` and pooling ``config.json``,
    or mean pooling without normalisation where it has no ``modules.json``."""
    root = Path(location)
    if not (root / MODULES_FILE).is_file():
        return Pooling()
    try:
        modules = json.loads((root / MODULES_FILE).read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{root / MODULES_FILE} is not valid JSON ({error})") from None
    kinds = [str(module.get("type", "")).rpartition(".")[2] for module in modules]
    unknown = [kind for kind in kinds if kind not in _MODULE_NAMES]
    if unknown or kinds[:1] != ["Transformer"] or kinds.count("Pooling") != 1:
        raise UserError(f"{root / MODULES_FILE} lists modules {', '.join(kinds)}: kprune prunes a "
                        f"sentence-transformers model made of a Transformer, one Pooling and optionally Normalize")
    pooling_dir = root / modules[kinds.index("Pooling")]["path"]
    return Pooling(_pooling_mode(pooling_dir / "config.json"), "Normalize" in kinds, str(root))


def read_max_seq_length(location: str | Path) -> int | None:
    """``max_seq_length`` of the folder's ``sentence_bert_config.json``: sentence-transformers truncates
    every text there; None without one."""
    path = Path(location) / SENTENCE_CONFIG
    if not path.is_file():
        return None
    limit = json.loads(path.read_text()).get("max_seq_length")
    return int(limit) if limit is not None else None


def _pooling_mode(path: Path) -> str:
    """The one pooling mode of a sentence-transformers pooling config (new ``pooling_mode`` or legacy flags)."""
    if not path.is_file():
        raise UserError(f"the pooling module's config {path} is missing")
    config = json.loads(path.read_text())
    modes = config.get("pooling_mode") or [mode for key, mode in _LEGACY_MODES.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise UserError(f"{path}: pooling {'+'.join(modes)} is not supported: kprune pools with one of "
                        f"{', '.join(POOLING_MODES)}")
    return modes[0]


class PoolingHook:
    """A forward hook (with kwargs) of a bare encoder that adds ``pooling``'s embedding of its last hidden
    state to its output under :data:`EMBEDDING_OUTPUT`."""

    def __init__(self, pooling: Pooling) -> None:
        self.pooling = pooling

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: ModelOutput) -> ModelOutput:
        hidden = output.last_hidden_state  # (batch, seq, d)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        output[EMBEDDING_OUTPUT] = self.pooling(hidden, mask)
        return output


def attach_pooling(model: PreTrainedModel, pooling: Pooling) -> None:
    """Make ``model``'s outputs carry ``pooling``'s sentence embedding (see :class:`PoolingHook`)."""
    model.register_forward_hook(PoolingHook(pooling), with_kwargs=True)


def _pooling_hooks(model: nn.Module) -> list[PoolingHook]:
    return [hook for hook in model._forward_hooks.values() if isinstance(hook, PoolingHook)]


def has_pooling(model: nn.Module) -> bool:
    """Whether :func:`attach_pooling` gave ``model`` a sentence pooling (its outputs carry :data:`EMBEDDING_OUTPUT`)."""
    return bool(_pooling_hooks(model))


def pooling_of(model: nn.Module) -> Pooling:
    """The pooling :func:`attach_pooling` gave ``model``."""
    hooks = _pooling_hooks(model)
    if not hooks:
        raise ValueError(f"{type(model).__name__} has no sentence pooling attached")
    return hooks[-1].pooling


def write_sentence_transformers_files(pooling: Pooling, hidden_size: int, directory: Path, max_length: int) -> None:
    """The sentence-transformers files of a model folder ``directory`` with ``pooling``: ``modules.json``,
    ``1_Pooling/config.json``, ``2_Normalize/`` when normalising, and the source folder's
    :data:`COPIED_FILES` (``sentence_bert_config.json`` with ``max_seq_length = max_length`` if it has none)."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"}]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": "sentence_transformers.models.Normalize"})
        (directory / NORMALIZE_DIR).mkdir(exist_ok=True)
    (directory / MODULES_FILE).write_text(json.dumps(modules, indent=2))
    (directory / POOLING_DIR).mkdir(exist_ok=True)
    flags = {key: mode == pooling.mode for key, mode in _LEGACY_MODES.items()}
    (directory / POOLING_DIR / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden_size, **flags},
                                                                    indent=2))
    source = Path(pooling.source) if pooling.source is not None else None
    for name in COPIED_FILES:
        if source is not None and (source / name).is_file():
            shutil.copyfile(source / name, directory / name)
    if not (directory / SENTENCE_CONFIG).is_file():
        (directory / SENTENCE_CONFIG).write_text(json.dumps({"max_seq_length": max_length, "do_lower_case": False}))


class SentenceEmbedding(TaskKind):
    """A bare encoder (``AutoModel``) read through its pooling; pair tasks evaluated by cosine similarity."""

    name: ClassVar[str] = "embedding"
    auto_class: ClassVar[type] = AutoModel
    head_suffix: ClassVar[str] = ""
    pipeline_tag: ClassVar[str] = "sentence-similarity"
    gradient_batch: ClassVar[int] = GLUE_GRADIENT_BATCH  # no official value: the sentence-level tasks' 32
    prediction_reads_first_token: ClassVar[bool] = False
    labelled: ClassVar[bool] = False

    def target_columns(self, task: TaskSpec) -> tuple[str, ...]:
        return ()

    def required_columns(self, task: TaskSpec, split: str) -> tuple[str, ...]:
        """The train split needs texts only; an evaluation split its gold scores too."""
        return (*task.text_keys, *((task.label_key,) if split in task.eval_splits else ()))

    def unlabeled_keys(self, task: TaskSpec) -> tuple[str, ...]:
        """One text per line: every line is a sentence of its own."""
        return task.text_keys[:1]

    def tokenize(self, task: TaskSpec, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 for_training: bool) -> Dataset:
        """One feature per text of a row (``task.text_keys`` the rows have, in order), each with the row's
        ``example_id``; texts stripped of surrounding white space and truncated as sentence-transformers does.
        No labels, for training or not."""
        keys = [key for key in task.text_keys if key in dataset.column_names]

        def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            texts = [str(batch[key][row]).strip() for row in range(len(indices)) for key in keys]
            encoded = tokenizer(texts, truncation=True, max_length=max_length)
            encoded["example_id"] = [index for index in indices for _ in keys]
            return encoded

        return dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                           desc="tokenize")

    def check_head(self, config: PretrainedConfig, task: TaskSpec, path: str) -> None:
        """Any checkpoint of a supported family will do: a task head, if any, is left out."""

    def configure_head(self, config: PretrainedConfig, task: TaskSpec) -> None:
        raise UserError(f"task {task.name} is a sentence-embedding task, without a head to fine-tune: "
                        f"prune a sentence-embedding model directly (kprune run task={task.name})")

    def prepare_model(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, location: str) -> None:
        """Attach the pooling read from ``location`` (:func:`read_pooling`; a hub id or no location gets the
        default) unless ``model`` has one attached already, and truncate where sentence-transformers does
        (:func:`read_max_seq_length`)."""
        local = bool(location) and Path(location).is_dir()
        if not has_pooling(model):
            attach_pooling(model, read_pooling(location) if local else Pooling())
        if local and (limit := read_max_seq_length(location)) is not None:
            tokenizer.model_max_length = min(tokenizer.model_max_length, limit)

    def write_companions(self, model: PreTrainedModel, directory: Path, max_length: int) -> None:
        """The sentence-transformers files, so that ``SentenceTransformer(directory, trust_remote_code=True)``
        embeds as kprune evaluated (:func:`write_sentence_transformers_files`)."""
        write_sentence_transformers_files(pooling_of(model), model.config.hidden_size, directory, max_length)

    def soft_target(self, outputs: ModelOutput, temperature: float, token_mask: torch.Tensor) -> torch.Tensor:
        """The teacher's sentence embeddings ``(batch, d)``."""
        return outputs[EMBEDDING_OUTPUT].detach()

    def distillation_loss(self, outputs: ModelOutput, target: torch.Tensor, temperature: float,
                          token_mask: torch.Tensor) -> torch.Tensor:
        """:data:`EMBEDDING_LOSS`, ``1 − cos(e_s, e_t)`` ``(batch,)``; the temperature is not used."""
        return 1.0 - F.cosine_similarity(outputs[EMBEDDING_OUTPUT], target, dim=-1)

    def evaluate(self, task: TaskSpec, dataset: Dataset, features: Dataset, predict: Predict) -> dict[str, float]:
        """Cosine similarity of each pair's two embeddings (features ``2i`` and ``2i + 1``) against the gold score."""
        if len(task.text_keys) != 2:
            raise UserError(f"task {task.name}: an embedding task is evaluated on sentence pairs (two text keys)")
        embeddings = np.stack(predict((EMBEDDING_OUTPUT,))[EMBEDDING_OUTPUT]).astype(np.float64)  # (2 * rows, d)
        first, second = embeddings[0::2], embeddings[1::2]
        norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
        similarity = (first * second).sum(axis=1) / np.maximum(norms, 1e-12)  # (rows,)
        return self.metrics(task, similarity, dataset[task.label_key])

    def metrics(self, task: TaskSpec, predictions: Sequence, references: Sequence) -> dict[str, float]:
        """``predictions``: cosine similarities, ``references``: gold scores, both ``(pairs,)``."""
        return label_metrics(task, predictions, references)
