"""Benchmark cases: a model, a calibration sample and a FLOPs model, built reproducibly.

- :func:`minilm_mrpc`: the fine-tuned MiniLM on MRPC with a sample of its training split (from
  ``../shared``), or, where that is absent, a randomly initialised model of the same shape with
  random tokens of MRPC-like lengths;
- :func:`random_case`: a randomly initialised BERT of any shape (e.g. BERT-base) with random tokens.

A case can be written to a directory (:meth:`BenchCase.save`) and read back in another process
(:func:`load_case`), so that each measurement runs in a fresh process whose peak memory is its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertConfig, PreTrainedModel

from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.flops import FlopsModel
from kprune_cli.pruners.base import PruneProblem
from kprune_cli.tasks.calibration import CalibrationSample, draw_calibration_sample
from kprune_cli.tasks.kinds import kind_of
from kprune_cli.tasks.spec import TaskSpec, get_task

SHARED_DIR = Path(os.environ.get("KPRUNE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
"""``../shared`` beside the project (or ``$KPRUNE_SHARED``): real data and fine-tuned models, when present."""

MINILM_SHAPE = dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536)
BERT_BASE_SHAPE = dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072)
MRPC_LENGTHS = (20, 100)
"""Range of the random sequences' lengths standing in for MRPC's (sentence pairs of ~53 tokens)."""


@dataclass
class BenchCase:
    """What a pruning benchmark runs on: ``model`` (float32, eval mode), ``task`` (its head and
    FLOPs sequence length), ``sample``, the FLOPs reduction ``rate``, and where they came from."""

    name: str
    model: PreTrainedModel
    task: TaskSpec
    sample: CalibrationSample
    rate: float
    source: str

    @property
    def flops(self) -> FlopsModel:
        adapter = get_adapter(self.model)
        return adapter.flops(self.task.avg_seq_len)

    def problem(self, device: torch.device | str = "cpu") -> PruneProblem:
        """The pruning problem of this case, with the model moved to ``device``."""
        model = self.model.to(device)
        return PruneProblem(model=model, adapter=get_adapter(model), task=self.task, sample=self.sample,
                            flops=self.flops, rate=self.rate, device=torch.device(device))

    def describe(self) -> dict:
        """JSON-able facts: shape, sample size (real tokens and padded positions), rate, source."""
        adapter = get_adapter(self.model)
        return {
            "name": self.name, "source": self.source, "task": self.task.name, "rate": self.rate,
            "layers": adapter.num_layers, "hidden": adapter.hidden_size, "vocab": self.model.config.vocab_size,
            "tokens": self.sample.num_tokens, "positions": self.positions, "examples": self.sample.num_examples,
        }

    @property
    def positions(self) -> int:
        """Token positions the passes compute, padding included (batches are padded to their longest)."""
        return sum(int(batch["attention_mask"].numel()) for batch in self.sample.batches)

    def save(self, directory: Path) -> Path:
        """Write the model (``save_pretrained``), the sample and the rest to ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory / "model")
        torch.save(self.sample.batches, directory / "sample.pt")
        (directory / "case.json").write_text(json.dumps(
            {"name": self.name, "task": self.task.name, "rate": self.rate, "source": self.source}))
        return directory


def load_case(directory: Path) -> BenchCase:
    """Read a case written by :meth:`BenchCase.save`."""
    meta = json.loads((directory / "case.json").read_text())
    task = get_task(meta["task"])
    model = kind_of(task).auto_class.from_pretrained(directory / "model", dtype=torch.float32).eval()
    sample = CalibrationSample(torch.load(directory / "sample.pt", weights_only=True))
    return BenchCase(meta["name"], model, task, sample, meta["rate"], meta["source"])


def random_sample(num_tokens: int, lengths: tuple[int, int], vocab_size: int, seed: int = 0,
                  batch_size: int = 32, token_type_ids: bool = True) -> CalibrationSample:
    """Random token ids (``[5, vocab_size)``) in sequences of random lengths in ``lengths``
    until ``num_tokens`` real tokens, sorted longest first and padded per batch like a drawn sample."""
    generator = torch.Generator().manual_seed(seed)
    drawn: list[int] = []
    while sum(drawn) < num_tokens:
        drawn.append(int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=generator)))
    drawn.sort(reverse=True)
    batches = []
    for begin in range(0, len(drawn), batch_size):
        part = torch.tensor(drawn[begin:begin + batch_size])
        seq = int(part.max())
        attention_mask = (torch.arange(seq)[None, :] < part[:, None]).long()  # (batch, seq)
        batch = {"input_ids": torch.randint(5, vocab_size, (len(part), seq), generator=generator) * attention_mask,
                 "attention_mask": attention_mask}
        if token_type_ids:
            batch["token_type_ids"] = (torch.arange(seq)[None, :] >= part[:, None] // 2).long() * attention_mask
        batches.append(batch)
    return CalibrationSample(batches)


def random_model(task: TaskSpec, seed: int = 0, vocab_size: int = 30522, **shape: int) -> PreTrainedModel:
    """A randomly initialised BERT of ``shape`` (``num_hidden_layers``, ``hidden_size`` ...) with
    ``task``'s head, float32, eval mode. Its linear weights are scaled up tenfold so that its
    predictions are far from uniform and distillation gradients are not vanishingly small."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, num_labels=task.num_labels, **shape)
    model = kind_of(task).auto_class.from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(10.0)
    return model


def random_case(name: str, num_tokens: int, rate: float = 0.6, seed: int = 0, vocab_size: int = 30522,
                task: str = "mrpc", lengths: tuple[int, int] = MRPC_LENGTHS, **shape: int) -> BenchCase:
    """A random model of ``shape`` with a random sample of ``num_tokens`` tokens."""
    spec = get_task(task)
    model = random_model(spec, seed, vocab_size, **shape)
    sample = random_sample(num_tokens, lengths, vocab_size, seed)
    return BenchCase(name, model, spec, sample, rate, source="random")


def minilm_mrpc(num_tokens: int, rate: float = 0.6, seed: int = 0, shared_dir: Path | None = SHARED_DIR,
                num_layers: int | None = None) -> BenchCase:
    """MiniLM fine-tuned on MRPC with ``num_tokens`` tokens of MRPC train, or the random stand-in.

    ``num_layers``: keep only the first layers (for scaling with depth).
    """
    from kprune_cli.models.loading import load_model
    from kprune_cli.tasks.data import load_task_data

    task = get_task("mrpc")
    model_dir = shared_dir / "models" / "minilm-mrpc" if shared_dir is not None else None
    data_dir = shared_dir / "data" / "glue" / "mrpc" if shared_dir is not None else None
    if model_dir is not None and model_dir.is_dir() and data_dir.is_dir():
        model, tokenizer = load_model(str(model_dir), task)
        data = load_task_data(task, data_dir, splits=[task.train_split])
        sample = draw_calibration_sample(task, data[task.train_split], tokenizer, num_tokens, seed)
        case = BenchCase("minilm-mrpc", model, task, sample, rate, source=str(model_dir))
    else:
        case = random_case("minilm-mrpc", num_tokens, rate, seed, **MINILM_SHAPE)
    if num_layers is not None:
        truncate(case.model, num_layers)
        case.name = f"{case.name}-{num_layers}l"
    return case


def truncate(model: PreTrainedModel, num_layers: int) -> None:
    """Keep only the first ``num_layers`` encoder layers of ``model`` (BERT layout), in place."""
    layers = get_adapter(model).layer_modules()
    del layers[num_layers:]
    model.config.num_hidden_layers = num_layers
