"""The model card (``README.md``) of a pruned checkpoint: Hugging Face front matter and what was done.

Built from plain values (:class:`ModelCard`), so this module knows nothing of kprune's report; the
pipeline fills them in (``kprune_cli/core/report.py``: ``model_card``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kprune_cli.models.families import COMMON_FILE, MODELING_FILE

CARD_NAME = "README.md"


@dataclass(frozen=True)
class ModelCard:
    """What a pruned checkpoint's card says.

    ``source``: the dense model as given (a directory or a hub id); ``base_model``: its hub id, or
    ``None`` when it is a local directory. ``metric``, ``dense``, ``pruned``: the task metric's name
    and values (fractions) on ``evaluated_on``. ``flops_kept``: pruned / dense FLOPs per example at
    sequence length ``seq_len``. ``layers`` / ``dense_layers``: ``{"heads", "neurons"}`` per layer,
    after and before pruning. ``command``: the command that made the checkpoint, if known.
    """

    task: str
    pipeline_tag: str
    auto_class: str
    source: str
    base_model: str | None
    pruner: str
    rate: float
    metric: str
    dense: float
    pruned: float
    evaluated_on: str
    flops_kept: float
    seq_len: float
    layers: Sequence[dict[str, int]]
    dense_layers: Sequence[dict[str, int]]
    command: str | None
    smoke: bool = False

    def front_matter(self) -> list[str]:
        """The YAML header the Hugging Face hub reads (strings JSON-quoted: valid YAML)."""
        tags = dict.fromkeys(["kprune", "pruning", "structured-pruning", self.pruner, self.task])
        lines = ["---"]
        if self.base_model is not None:
            lines.append(f"base_model: {json.dumps(self.base_model)}")
        lines += ["library_name: transformers", f"pipeline_tag: {self.pipeline_tag}", "tags:",
                  *[f"- {json.dumps(tag)}" for tag in tags], "---"]
        return lines

    def render(self) -> str:
        """The whole card, Markdown."""
        lines = [
            *self.front_matter(),
            "",
            f"# {self.task}: `{self.source}` pruned with kprune ({self.pruner}, rate {self.rate})",
            "",
            *(["**Smoke run: the metric below is a quick check, not a result.**", ""] if self.smoke else []),
            f"Pruned without retraining by kprune (`pruner={self.pruner}`): whole attention heads and FFN neurons "
            f"were removed from `{self.source}` to take {self.rate:.0%} of its FLOPs per example away.",
            "",
            "| | dense | pruned |",
            "|---|---|---|",
            f"| {self.metric} ({self.evaluated_on}) | {self.dense:.4f} | {self.pruned:.4f} |",
            f"| FLOPs per example (sequence length {self.seq_len:.2f}) | 100% | {self.flops_kept:.1%} |",
            "",
            "## Kept structure",
            "",
            "| layer | heads | FFN neurons |",
            "|---|---|---|",
            *[f"| {index} | {layer['heads']} / {dense['heads']} | {layer['neurons']} / {dense['neurons']} |"
              for index, (layer, dense) in enumerate(zip(self.layers, self.dense_layers))],
            "",
            "## How it was made",
            "",
            *(["```bash", self.command, "```"] if self.command else ["With `kprune run` (command not recorded)."]),
            "",
            "## Use",
            "",
            "Loading needs `trust_remote_code=True`: each layer keeps its own number of heads and neurons, "
            f"which the stock classes cannot express, so this folder ships `{MODELING_FILE}` (this family's "
            f"pruned classes) and `{COMMON_FILE}` (the layer surgery they share); both import only torch and "
            "transformers. kprune need not be installed. Read them before you trust them, as with any remote code.",
            "",
            "```python",
            f"from transformers import AutoModel, {self.auto_class}, AutoTokenizer",
            "",
            'path = "path/to/pruned"  # this folder, or its hub id',
            f"model = {self.auto_class}.from_pretrained(path, trust_remote_code=True)",
            "encoder = AutoModel.from_pretrained(path, trust_remote_code=True)  # features, no task head",
            "tokenizer = AutoTokenizer.from_pretrained(path)",
            "```",
            "",
        ]
        return "\n".join(lines)


def write_model_card(directory: Path, card: ModelCard) -> Path:
    """Write ``card`` as ``directory/README.md`` (through a temporary sibling: never half a card);
    returns its path."""
    path = Path(directory) / CARD_NAME
    staging = path.with_name(f".{CARD_NAME}.tmp")
    staging.write_text(card.render())
    staging.replace(path)
    return path
