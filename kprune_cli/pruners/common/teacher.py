"""Teacher signals: what the original (unpruned) model says about the calibration sample.

A pruner that distils from the original model builds a :class:`Teacher` before it changes any
weight. It holds

- the sample as device micro-batches (:class:`DistillBatch`), each with the teacher's soft
  target: log-probabilities at temperature ``T`` (classification; QA start/end positions,
  padding excluded) or raw outputs (regression);
- optionally a frozen copy of the original model, from which :meth:`Teacher.residual_sums`
  computes the residual sums ``X + out_proj(A) + b`` of one layer's sub-layers
  on demand, bottom-up (:class:`ResidualSums`; a pruner that tunes layer by layer bottom-up can
  take them from the model itself and skip the copy). A sum is read where the family forms it
  (:meth:`~kprune_cli.models.adapters.LayerParts.sum_tap`): the input of the LayerNorm after the
  sub-layer (post-LN), or the residual stream after it (pre-norm).

No gold labels are read anywhere.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from kprune_cli.models.adapters import get_adapter
from kprune_cli.models.precision import full_precision
from kprune_cli.pruners.common import sublayer_kind
from kprune_cli.pruners.common.hooks import capture_taps
from kprune_cli.pruners.common.reconstruction import TokenBatch
from kprune_cli.pruners.common.window import LayerWindow, advance, encoder_inputs
from kprune_cli.tasks.calibration import DRAW_INDEX, CalibrationSample
from kprune_cli.tasks.data import MODEL_INPUT_KEYS, TARGET_KEYS
from kprune_cli.tasks.kinds import get_kind


@dataclass
class DistillBatch(TokenBatch):
    """One micro-batch of the sample with the teacher's soft target.

    ``inputs``: model inputs on the device, ``(batch, seq)``; ``token_mask``: ``(batch, seq)``
    bool, True on real tokens; ``target``: ``(batch, labels)`` log-probabilities
    (classification) or outputs (regression), or ``(batch, 2, seq)`` start/end log-probabilities (QA);
    ``draw_index``: ``(batch,)`` long on the device, each sequence's place in the sample's draw order.
    """

    target: torch.Tensor
    draw_index: torch.Tensor
    _groups: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def gradient_groups(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient batches of ``size`` sequences (in draw order) that this micro-batch's sequences
        fall in, ``(groups,)`` long, and which sequence is in which, ``(groups, batch)`` float64 (1 or 0).
        Found once per ``size`` (a data-dependent size: one host sync on a GPU), so that the
        measurement passes, which use them at every sub-layer, need none."""
        if size not in self._groups:
            groups, inverse = torch.unique(self.draw_index // size, return_inverse=True)
            positions = torch.arange(len(self.draw_index), device=self.draw_index.device)
            membership = torch.zeros(len(groups), len(self.draw_index), dtype=torch.float64,
                                     device=self.draw_index.device)
            membership[inverse, positions] = 1.0
            self._groups[size] = groups, membership
        return self._groups[size]


def micro_batches(sample: CalibrationSample, batch_size: int | None, device: torch.device | str,
                  with_targets: bool = False, with_draw_index: bool = False) -> list[dict[str, torch.Tensor]]:
    """The sample's model inputs on ``device`` in micro-batches of at most ``batch_size`` sequences.

    A calibration batch larger than ``batch_size`` is split; consecutive smaller ones are merged
    while their sequences fit in ``batch_size`` (right-padded to the longest; ``None``: the
    calibration batches as they are). Columns that are padding in every sequence of a micro-batch
    are then dropped (sorted batches mostly lose their padding); neither changes any real token's
    output. With ``with_targets`` the batch's gold targets (``labels`` or ``start_positions`` /
    ``end_positions``, ``(batch,)``) come along too; with ``with_draw_index``, the sequences'
    places in the draw order under :data:`~kprune_cli.tasks.calibration.DRAW_INDEX` ``(batch,)``.
    """
    parts = []
    for batch in _merged(sample, batch_size, device, with_targets, with_draw_index):
        size = int(batch["input_ids"].shape[0])
        step = size if batch_size is None else batch_size
        parts += [drop_padding_columns({key: value[start:start + step] for key, value in batch.items()})
                  for start in range(0, size, step)]
    return parts


def drop_padding_columns(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` without the trailing columns that are padding in all its sequences: the model inputs
    ``(batch, seq)`` are cut to ``(batch, used)``; other values, ``(batch,)``, stay as they are."""
    used = batch["attention_mask"].bool().any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    return {key: value[:, :length] if key in MODEL_INPUT_KEYS else value for key, value in batch.items()}


def _merged(sample: CalibrationSample, batch_size: int | None, device: torch.device | str, with_targets: bool,
            with_draw_index: bool) -> list[dict[str, torch.Tensor]]:
    """The calibration batches on ``device``, consecutive ones concatenated while their sequences
    fit in ``batch_size`` (each batch alone when it is ``None``)."""
    groups: list[list[dict[str, torch.Tensor]]] = []
    for batch, draw_index in zip(sample.batches, sample.draw_indices()):
        values = sample.model_inputs(batch, device)
        values.update({key: batch[key].to(device) for key in TARGET_KEYS if with_targets and key in batch})
        if with_draw_index:
            values[DRAW_INDEX] = draw_index.to(device)
        held = sum(int(part["input_ids"].shape[0]) for part in groups[-1]) if groups else 0
        if groups and batch_size is not None and held + int(values["input_ids"].shape[0]) <= batch_size:
            groups[-1].append(values)
        else:
            groups.append([values])
    return [group[0] if len(group) == 1 else _concatenated(group) for group in groups]


def _concatenated(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``batches`` as one, the model inputs right-padded with zeros to the longest (the attention mask
    marks the padding)."""
    length = max(int(batch["input_ids"].shape[1]) for batch in batches)
    return {key: torch.cat([F.pad(batch[key], (0, length - batch[key].shape[1])) if key in MODEL_INPUT_KEYS
                            else batch[key] for batch in batches]) for key in batches[0]}


def distillation_loss(outputs: ModelOutput, target: torch.Tensor, kind: str, temperature: float,
                      token_mask: torch.Tensor) -> torch.Tensor:
    """Per-sample distillation loss ``(batch,)`` of the student's ``outputs`` against ``target``, as the
    task kind ``kind`` defines it (:meth:`~kprune_cli.tasks.kinds.base.TaskKind.distillation_loss`).

    Classification: ``T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))``; QA: the mean of the start- and
    end-position KLs over real tokens; regression: squared error (mean over outputs).
    """
    return get_kind(kind).distillation_loss(outputs, target, temperature, token_mask)


class ResidualSums:
    """A model's residual sums ``X + out_proj(A) + b`` on the sample's real tokens,
    one layer at a time, masks not applied.

    The hidden states entering the next layer are kept, so asking for the layers bottom-up runs
    every layer once in all (one :class:`~kprune_cli.pruners.common.window.LayerWindow` pass per
    layer); asking for an earlier layer starts over from the embeddings. A layer's sums (and the
    hidden states leaving it) come from the model's weights at the time they are first asked
    for: on a model being pruned, ask for layer ``l`` before any weight of layer ``l`` changes
    and never go back (K-prune's schedule does so), or give a frozen copy.

    Kept: one layer's sums and one set of hidden states, float32 on the device, about
    ``3 · tokens · d`` values (100K tokens at d = 768: 0.9 GB). Half precision would halve that
    but perturb the tuned weights; full precision keeps them exact.
    """

    def __init__(self, model: PreTrainedModel, batches: Sequence[TokenBatch]) -> None:
        self.model = model
        self.batches = batches
        self._sums: tuple[int, dict[str, list[torch.Tensor]]] | None = None  # (layer, sums by kind)
        self._hidden: tuple[int, list[torch.Tensor]] | None = None  # (layer, its input per batch)

    def __call__(self, sublayer: int) -> list[torch.Tensor]:
        """Per micro-batch, the residual sum of ``sublayer`` on real tokens: ``(tokens_b, d)``."""
        layer = sublayer // 2
        if self._sums is None or self._sums[0] != layer:
            self._sums = None  # release the old sums as the new ones are made
            self._sums = (layer, self._layer_sums(layer))
        return self._sums[1][sublayer_kind(sublayer)]

    @torch.no_grad()
    def _layer_sums(self, layer: int) -> dict[str, list[torch.Tensor]]:
        """Run the layers up to ``layer`` from the kept hidden states (or the embeddings),
        capturing ``layer``'s residual sums and keeping the hidden states entering ``layer + 1``."""
        adapter = get_adapter(self.model)
        inputs = [batch.inputs for batch in self.batches]
        if self._hidden is None or self._hidden[0] > layer:
            self._hidden = (0, encoder_inputs(self.model, adapter, inputs))
        start, hidden = self._hidden
        self._hidden = None
        for current in range(start, layer):
            hidden = advance(self.model, adapter, None, current, inputs, hidden)
        parts = adapter.layers()[layer]
        sums: dict[str, list[torch.Tensor]] = {"mha": [], "ffn": []}
        with capture_taps({kind: parts.sum_tap(kind) for kind in sums}) as store, \
                LayerWindow(self.model, adapter, layer, layer + 1) as window:
            for index, batch in enumerate(self.batches):
                hidden[index] = full_precision(window(batch.inputs, hidden[index]))  # (batch, seq, d), layer + 1
                for kind, values in sums.items():
                    values.append(full_precision(batch.select(store[kind])))  # (tokens_b, d)
        self._hidden = (layer + 1, hidden)
        return sums


class Teacher:
    """The original model's soft targets on the sample, and its residual sums on demand.

    Build it before changing any weight of ``model``. With ``keep_model=False`` no copy is
    made and :meth:`residual_sums` is unavailable (enough for methods that do not tune, or that
    take the sums from the model itself with :class:`ResidualSums`).
    """

    def __init__(self, model: PreTrainedModel, kind: str, sample: CalibrationSample, temperature: float,
                 batch_size: int | None, device: torch.device | str, keep_model: bool = True) -> None:
        strategy = get_kind(kind)
        self.kind = kind
        self.temperature = temperature
        self.batches: list[DistillBatch] = []
        with torch.no_grad():
            for inputs in micro_batches(sample, batch_size, device, with_draw_index=True):
                draw_index = inputs.pop(DRAW_INDEX)
                token_mask = inputs["attention_mask"].bool()
                target = strategy.soft_target(model(**inputs), temperature, token_mask)
                self.batches.append(DistillBatch(inputs, token_mask, target, draw_index))
        self._sums = ResidualSums(copy.deepcopy(model).eval(), self.batches) if keep_model else None

    @property
    def num_samples(self) -> int:
        return sum(batch.size for batch in self.batches)

    def residual_sums(self, sublayer: int) -> list[torch.Tensor]:
        """Per micro-batch, the teacher's residual sum of ``sublayer`` on real tokens: ``(tokens_b, d)``."""
        if self._sums is None:
            raise RuntimeError("this Teacher was built with keep_model=False")
        return self._sums(sublayer)
