"""Loading fine-tuned (or pruned) encoders and their tokenizers, with clear errors for user mistakes.

``path`` is a local Hugging Face directory or a hub id. Weights are loaded in float32 (the shared
models are stored in float16), in eval mode, on the requested device. Pruned checkpoints written by
:func:`kprune_cli.models.checkpoint.save_pruned` are recognised by ``kprune_structure`` in their config
and loaded through their own ``modeling_kprune.py`` (``trust_remote_code`` only for those), whatever
kprune version wrote them.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from kprune_cli.models.adapters import check_supported
from kprune_cli.models.families import layout_of
from kprune_cli.models.families.kprune_common import STRUCTURE_KEY
from kprune_cli.runtime.errors import UserError
from kprune_cli.tasks.kinds import kind_of
from kprune_cli.tasks.spec import TaskSpec

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# Files of which a local directory needs one for AutoTokenizer to load a real vocabulary
# (transformers 5 silently builds an empty tokenizer otherwise).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "spm.model", "tokenizer.model")  # spm.model: DeBERTa-v2/v3
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters of ``model`` (tied weights counted once)."""
    return sum(parameter.numel() for parameter in model.parameters())


def load_model(path: str, task: TaskSpec, device: torch.device | str = "cpu"
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fine-tuned (or pruned) model for ``task`` and its tokenizer, float32, in eval mode, on ``device``.

    The checkpoint must carry the head of the task's kind
    (:meth:`~kprune_cli.tasks.kinds.base.TaskKind.check_head`): ``...ForQuestionAnswering`` for a QA
    task, ``...ForSequenceClassification`` with ``task.num_labels`` outputs for a GLUE task.
    """
    path = str(path)
    location = locate_model(path)
    config = _load_config(location, path)
    kind_of(task).check_head(config, task, path)
    tokenizer = _load_tokenizer(location, path)
    model, info = _load_weights(location, path, task, config, output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UserError(f"model {path!r} lacks weights for {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}: it is not a complete {task.name} checkpoint")
    _limit_sequence_length(tokenizer, config)
    kind_of(task).prepare_model(model, tokenizer, location)
    return model.to(device).eval(), tokenizer


def _limit_sequence_length(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> None:
    """Never tokenise longer than the model has position embeddings for (RoBERTa's, XLM-RoBERTa's and
    MPNet's start at ``pad_token_id + 1``)."""
    positions = config.max_position_embeddings
    if layout_of(config).positions_after_padding:
        positions -= config.pad_token_id + 1
    tokenizer.model_max_length = min(tokenizer.model_max_length, positions)


def load_for_finetuning(path: str, task: TaskSpec, device: torch.device | str = "cpu"
                        ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model to fine-tune on ``task`` (train mode) and its tokenizer.

    A pretrained encoder without the task's head (e.g. a ``BertModel`` directory) gets a freshly
    initialised one with ``task.num_labels`` outputs (``problem_type="regression"`` for one output);
    a head of another size is replaced.
    """
    path = str(path)
    location = locate_model(path)
    config = _load_config(location, path)
    tokenizer = _load_tokenizer(location, path)
    kind_of(task).configure_head(config, task)
    model = _load_weights(location, path, task, config, ignore_mismatched_sizes=True)
    _limit_sequence_length(tokenizer, config)
    return model.to(device).train(), tokenizer


def stored_dtype(path: str) -> torch.dtype:
    """The dtype the checkpoint at ``path`` stores its weights in, per its config (float32 if unrecorded).

    Pass it to :func:`~kprune_cli.models.checkpoint.save_pruned` so a pruned copy of a float16
    checkpoint is stored in float16 too (models are always loaded and pruned in float32).
    """
    path = str(path)
    dtype = _load_config(locate_model(path), path).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def locate_model(path: str) -> str:
    """The local model directory ``path`` after checking that it holds a config, weights and a
    tokenizer (a :class:`UserError` naming what is missing), or ``path`` itself for a hub id."""
    local = Path(path).expanduser()
    if not local.exists():
        if _HUB_ID.match(path):
            return path  # a hub id: the loaders fetch it, or fail in _hub_error
        raise UserError(f"model path {path!r} does not exist: pass a model directory or a hub id")
    if not local.is_dir():
        raise UserError(f"model path {path!r} is a file: pass the directory that holds config.json and the weights")
    if not (local / "config.json").is_file():
        raise UserError(f"model directory {path!r} has no config.json: pass a Hugging Face model directory")
    if not any(next(local.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise UserError(f"model directory {path!r} holds no weights (no {' or '.join(WEIGHT_PATTERNS)} file)")
    if not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"model directory {path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                        "save the tokenizer beside the model")
    return str(local)


def _hub_error(path: str, error: Exception) -> UserError:
    return UserError(f"cannot load {path!r}: it is not a local directory and the Hugging Face hub is "
                     f"unreachable or has no such model id ({type(error).__name__}); pass a local model directory")


def _is_hub(location: str) -> bool:
    return not Path(location).exists()


def _load_config(location: str, path: str) -> PretrainedConfig:
    """The config of the checkpoint, after checking that its family is supported."""
    try:
        config = AutoConfig.from_pretrained(location)
    except OSError as error:
        if _is_hub(location):
            raise _hub_error(path, error) from error
        raise UserError(f"cannot read the config of model {path!r}: {error}") from error
    except ValueError as error:  # unknown model_type
        raise UserError(f"unsupported architecture in {path!r}: {str(error).splitlines()[0]}") from error
    check_supported(config)
    return config


def _load_tokenizer(location: str, path: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as error:
        if _is_hub(location):
            raise _hub_error(path, error) from error
        raise UserError(f"cannot load the tokenizer of model {path!r}: {str(error).splitlines()[0]}") from error


def _load_weights(location: str, path: str, task: TaskSpec, config: PretrainedConfig, **kwargs):
    """``from_pretrained`` of the task kind's Auto class in float32, its messages silenced, its errors explained.

    The attention is PyTorch's SDPA where the family has it (else eager), never a library's choice:
    transformers 4.5x picks FlashAttention-2 for ModernBERT when ``flash-attn`` is installed, which
    unpads the batch (``(tokens, d)`` hidden states) under the pruners' hooks; and ModernBERT's
    ``reference_compile`` (4.5x) is switched off, as it would recompile whenever the hooks change.
    """
    auto_class = kind_of(task).auto_class
    ours = hasattr(config, STRUCTURE_KEY)  # a pruned checkpoint with modeling_kprune.py beside it
    if hasattr(config, "reference_compile"):
        config.reference_compile = False
    try:
        with _quiet_loading():
            return auto_class.from_pretrained(location, config=config, dtype=torch.float32, trust_remote_code=ours,
                                              attn_implementation=attention_of(auto_class, config), **kwargs)
    except SafetensorError as error:
        raise UserError(f"the weights of model {path!r} are corrupted or truncated ({error}): "
                        "copy or download them again") from error
    except (OSError, RuntimeError) as error:
        if _is_hub(location):
            raise _hub_error(path, error) from error
        raise UserError(f"cannot load the weights of model {path!r}: {str(error).splitlines()[0]}") from error


def attention_of(auto_class: type, config: PretrainedConfig) -> str:
    """``"sdpa"`` where the stock model class of ``config`` supports it, else ``"eager"`` (MPNet,
    DeBERTa-v2; a pruned checkpoint's class has its stock family's attention)."""
    stock = auto_class._model_mapping.get(type(config), None)
    return "sdpa" if stock is not None and getattr(stock, "_supports_sdpa", False) else "eager"


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Drop transformers' load report (e.g. "newly initialized" heads) while loading.

    A filter, not a higher logger level: transformers 5 runs extra checks that warn when that
    logger's level is WARNING or above.
    """
    logger = logging.getLogger("transformers.modeling_utils")

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    logger.addFilter(errors_only)
    try:
        yield
    finally:
        logger.removeFilter(errors_only)
