"""Re-fit the LayerNorm that reads a tuned sub-layer's residual sum, channel by channel (opt-in).

After KPWT a pruned sub-layer's residual sum ``h`` still differs from the teacher's ``Y``; the
LayerNorm that reads it normalises each token, so what is left is largely a per-channel error of
scale and offset in its output. With ``n = LN₀(h)`` ``(tokens, d)``, the student's sum normalised
without gain or bias, and ``z = γ₀ ⊙ LN₀(Y) + β₀``, the teacher's output of the same LayerNorm with
its current values, each channel ``j`` gets the closed-form ridge fit

    min_{γ_j, β_j}  Σ_t (γ_j·n_tj + β_j − z_tj)²  +  ρ·N·((γ_j − γ₀_j)² + (β_j − β₀_j)²)

(``N`` tokens; a 2×2 system per channel, from the sums of :class:`ChannelMoments`):

    [S_nn + ρN   S_n   ] [γ_j]   [S_nz + ρN·γ₀_j]
    [S_n         N + ρN] [β_j] = [S_z  + ρN·β₀_j]

A LayerNorm without a bias (ModernBERT's) fits ``γ`` alone. The shrinkage ``ρ`` is chosen on held-out
halves of the sample (interleaved micro-batches, as KPWT's check): each half is scored with the fit
on the other from its moments alone, over :data:`SHRINK_GRID`, and the current values are kept
(:data:`KEEP`) when no fit beats them there. A channel whose system is singular keeps its values.

That least-squares fit (``"least_squares"``) regresses the teacher on a noisy copy of itself, so its gains
come out smaller than the teacher's (regression dilution: ``γ_j = cov(n_j, z_j) / var(n_j)``), and the
shrinkage compounds from layer to layer (measured on MiniLM-MRPC at rate 0.8: gains 4-18% below the old
ones, lower layer by layer). ``"moments"`` instead gives each channel of the student's output the teacher's
mean and variance (:func:`match_moments`; a LayerNorm without a bias: its mean square), from the same sums:

    γ_j = sign(γ₀_j)·sqrt(var(z_j) / var(n_j))        β_j = mean(z_j) − γ_j·mean(n_j)

It has nothing to choose, so it has no held-out choice (its held-out error is still reported).

Which LayerNorm (:func:`following_norm`): in a post-LN layer the one right after the sub-layer; in a
pre-norm layer the next sub-layer's input norm (none after the last layer: the family's final norm is
not the adapter's). The pruner writes the values (and defers a norm of the next layer until that
layer's teacher sums were taken, docs/kprune-plus.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from kprune_cli.models.adapters import ModelAdapter
from kprune_cli.models.masks import Masks
from kprune_cli.pruners.common import sublayer_kind
from kprune_cli.pruners.common.reconstruction import TokenBatch, sublayer_activations

NORM_REFITS = ("least_squares", "moments")
"""The ways :func:`refit_norm` fits a LayerNorm (module docstring)."""

SHRINK_GRID = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
"""Relative shrinkages ρ towards the current values that :func:`refit_norm` chooses from."""

KEEP = math.inf
"""The shrinkage that stands for "keep the current values" (the limit of an ever larger ρ)."""

HELD_OUT_FOLDS = 2
"""Interleaved parts of the micro-batches that choose ρ."""


@dataclass
class ChannelMoments:
    """Per-channel sums over tokens (float64, each ``(d,)``) of the student's normalised sum ``n`` and
    the teacher's LayerNorm output ``z``: ``n``, ``nn`` (Σ n²), ``nz`` (Σ n·z), ``z``, ``zz`` (Σ z²), and
    ``tokens``. Any ``(γ, β)``'s squared error on those tokens follows from them (:meth:`error`)."""

    tokens: int
    n: torch.Tensor
    nn: torch.Tensor
    nz: torch.Tensor
    z: torch.Tensor
    zz: torch.Tensor

    @classmethod
    def of(cls, n: torch.Tensor, z: torch.Tensor) -> "ChannelMoments":
        """The moments of ``n`` and ``z`` ``(tokens, d)``."""
        n, z = n.double(), z.double()
        return cls(int(n.shape[0]), n.sum(0), (n * n).sum(0), (n * z).sum(0), z.sum(0), (z * z).sum(0))

    def __add__(self, other: "ChannelMoments") -> "ChannelMoments":
        return ChannelMoments(self.tokens + other.tokens, self.n + other.n, self.nn + other.nn,
                              self.nz + other.nz, self.z + other.z, self.zz + other.zz)

    def error(self, gain: torch.Tensor, bias: torch.Tensor | None) -> float:
        """``Σ_t Σ_j (γ_j·n_tj + β_j − z_tj)²`` for ``gain`` ``(d,)`` and ``bias`` ``(d,)`` (None: 0)."""
        gain = gain.double()
        total = gain * gain * self.nn - 2.0 * gain * self.nz + self.zz
        if bias is not None:
            bias = bias.double()
            total = total + 2.0 * gain * bias * self.n + bias * bias * self.tokens - 2.0 * bias * self.z
        return float(total.sum())


def fit_channels(moments: ChannelMoments, gain: torch.Tensor, bias: torch.Tensor | None,
                 shrink: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The per-channel ridge fit (module docstring) towards ``gain`` ``(d,)`` and ``bias`` ``(d,)`` (None:
    fit the gain alone) with relative shrinkage ``shrink``; float64. Channels whose system is singular
    or gives non-finite values keep theirs."""
    mu = shrink * moments.tokens
    gain0 = gain.double()
    if bias is None:
        denominator = moments.nn + mu
        fitted = (moments.nz + mu * gain0) / denominator
        return torch.where((denominator > 0) & fitted.isfinite(), fitted, gain0), None
    bias0 = bias.double()
    a, b, c = moments.nn + mu, moments.n, moments.tokens + mu  # [[a, b], [b, c]]
    det = a * c - b * b
    rhs_gain, rhs_bias = moments.nz + mu * gain0, moments.z + mu * bias0
    new_gain = (c * rhs_gain - b * rhs_bias) / det
    new_bias = (a * rhs_bias - b * rhs_gain) / det
    ok = (det > 1e-12 * a * c) & new_gain.isfinite() & new_bias.isfinite()
    return torch.where(ok, new_gain, gain0), torch.where(ok, new_bias, bias0)


def match_moments(moments: ChannelMoments, gain: torch.Tensor,
                  bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per channel, the gain and bias under which the student's output has the teacher's mean and variance
    on the sample (module docstring), keeping the signs of ``gain`` ``(d,)``; with ``bias`` None, the gain
    alone, matching the mean square. float64; a channel with no spread (or a non-finite fit) keeps its values."""
    tokens = moments.tokens
    gain0 = gain.double()
    if bias is None:
        fitted = torch.sign(gain0) * torch.sqrt(moments.zz / moments.nn)
        return torch.where((moments.nn > 0) & fitted.isfinite(), fitted, gain0), None
    mean_n, mean_z = moments.n / tokens, moments.z / tokens
    var_n = moments.nn / tokens - mean_n ** 2
    var_z = (moments.zz / tokens - mean_z ** 2).clamp(min=0.0)
    new_gain = torch.sign(gain0) * torch.sqrt(var_z / var_n)
    new_bias = mean_z - new_gain * mean_n
    ok = (var_n > 1e-12) & new_gain.isfinite() & new_bias.isfinite()
    return torch.where(ok, new_gain, gain0), torch.where(ok, new_bias, bias.double())


@dataclass
class NormFit:
    """The re-fitted values of one LayerNorm: ``gain`` ``(d,)`` and ``bias`` ``(d,)`` (None without one),
    in the module's dtype; ``shrink``: the ρ chosen (:data:`KEEP`: the values are the current ones; None:
    ``"moments"``, which has none); ``held_out``: the held-out error of the fit over the current values'
    (None: not checked)."""

    gain: torch.Tensor
    bias: torch.Tensor | None
    shrink: float | None
    held_out: float | None


def following_norm(adapter: ModelAdapter, sublayer: int) -> nn.LayerNorm | None:
    """The LayerNorm that reads ``sublayer``'s residual sum (module docstring), or None: after the last
    pre-norm layer, or where that module is not an ``nn.LayerNorm``."""
    layers = adapter.layers()
    layer, kind = sublayer // 2, sublayer_kind(sublayer)
    parts = layers[layer]
    if not parts.pre_norm:
        norm = parts.attn_norm if kind == "mha" else parts.ffn_norm
    elif kind == "mha":
        norm = parts.ffn_norm
    else:
        norm = layers[layer + 1].attn_norm if layer + 1 < len(layers) else None
    return norm if isinstance(norm, nn.LayerNorm) else None


def norm_layer(adapter: ModelAdapter, sublayer: int) -> int:
    """The layer whose LayerNorm :func:`following_norm` names: the next one after a pre-norm FFN."""
    return sublayer // 2 + (1 if adapter.layers()[0].pre_norm and sublayer_kind(sublayer) == "ffn" else 0)


@torch.no_grad()
def refit_norm(model: PreTrainedModel, adapter: ModelAdapter, masks: Masks, batches: Sequence[TokenBatch],
               teacher_sums: Sequence[torch.Tensor], sublayer: int,
               hidden: Sequence[torch.Tensor] | None = None, method: str = "least_squares",
               grid: Sequence[float] = SHRINK_GRID) -> NormFit | None:
    """Re-fit the LayerNorm after ``sublayer`` towards the teacher's output of it, by ``method`` (one of
    :data:`NORM_REFITS`); the model is not changed.

    ``teacher_sums[i]`` ``(tokens_i, d)``: the teacher's residual sum on ``batches[i]``'s selected tokens;
    ``hidden[i]``: the student's hidden states entering the sub-layer's layer (the pass starts there).
    Call it after the sub-layer is tuned and before the LayerNorm changes. None when there is no
    LayerNorm to fit (:func:`following_norm`).
    """
    norm = following_norm(adapter, sublayer)
    if norm is None:
        return None
    gain0 = norm.weight.detach()
    bias0 = norm.bias.detach() if norm.bias is not None else None
    folds: list[ChannelMoments | None] = [None] * min(HELD_OUT_FOLDS, len(batches))
    for index, (batch, target) in enumerate(zip(batches, teacher_sums)):
        student = sublayer_activations(model, adapter, masks, batch, sublayer,
                                       hidden[index] if hidden is not None else None).y  # (tokens, d)
        n = F.layer_norm(student.double(), norm.normalized_shape, eps=norm.eps)
        z = F.layer_norm(target.double(), norm.normalized_shape, gain0.double(),
                         bias0.double() if bias0 is not None else None, norm.eps)
        moments = ChannelMoments.of(n, z)
        fold = index % len(folds)
        folds[fold] = moments if folds[fold] is None else folds[fold] + moments
    total = folds[0] if len(folds) == 1 else folds[0] + folds[1]
    if method == "moments":
        gain, bias = match_moments(total, gain0, bias0)
        held_out = _held_out_ratio(folds, gain0, bias0, lambda fitted: match_moments(fitted, gain0, bias0))
        return NormFit(gain.to(gain0.dtype), bias.to(bias0.dtype) if bias is not None else None, None, held_out)
    shrink, held_out = _chosen_shrink(folds, gain0, bias0, grid) if len(folds) == 2 else (grid[0], None)
    if shrink == KEEP:
        return NormFit(gain0.clone(), bias0.clone() if bias0 is not None else None, KEEP, held_out)
    gain, bias = fit_channels(total, gain0, bias0, shrink)
    return NormFit(gain.to(gain0.dtype), bias.to(bias0.dtype) if bias is not None else None, shrink, held_out)


def _held_out_ratio(folds: Sequence[ChannelMoments], gain: torch.Tensor, bias: torch.Tensor | None,
                    fit: Callable[[ChannelMoments], tuple[torch.Tensor, torch.Tensor | None]]) -> float | None:
    """Each of two folds scored with ``fit`` of the other, over the current values' error (None: one fold)."""
    if len(folds) < 2:
        return None
    first, second = folds
    kept = first.error(gain, bias) + second.error(gain, bias)
    fitted = second.error(*fit(first)) + first.error(*fit(second))
    return fitted / kept if kept > 0 else 1.0


def _chosen_shrink(folds: Sequence[ChannelMoments], gain: torch.Tensor, bias: torch.Tensor | None,
                   grid: Sequence[float]) -> tuple[float, float]:
    """The ρ of ``grid`` whose fits on one fold score best on the other, summed both ways, or :data:`KEEP`
    when none beats the current values (ties go to the larger ρ); with its held-out error over the current
    values' (:func:`_held_out_ratio`)."""
    ratios = {shrink: _held_out_ratio(folds, gain, bias, lambda fitted, shrink=shrink: fit_channels(
        fitted, gain, bias, shrink)) for shrink in grid}
    ratios[KEEP] = 1.0
    shrink = min(ratios, key=lambda value: (ratios[value], -value))
    return shrink, ratios[shrink]


@torch.no_grad()
def write_norm(adapter: ModelAdapter, sublayer: int, fit: NormFit) -> None:
    """Write ``fit`` into the LayerNorm after ``sublayer`` (:func:`following_norm`)."""
    norm = following_norm(adapter, sublayer)
    norm.weight.copy_(fit.gain)
    if fit.bias is not None:
        norm.bias.copy_(fit.bias)


def norm_refit_notes(fits: dict[str, NormFit], num_sublayers: int) -> list[str]:
    """The report's line on ``pruner.norm_refit``: ``fits`` by sub-layer, of ``num_sublayers``."""
    refitted = [fit for fit in fits.values() if fit.shrink != KEEP]  # "moments" (shrink None) always fits
    kept = sorted(int(key) for key, fit in fits.items() if fit.shrink == KEEP)
    ratios = [fit.held_out for fit in refitted if fit.held_out is not None]
    line = f"pruner.norm_refit: {len(refitted)} of {num_sublayers} LayerNorms re-fitted"
    if ratios:
        line += f" (held-out error {min(ratios):.3f}-{max(ratios):.3f}x that of the previous values)"
    if kept:
        line += f"; kept where no fit helped held-out tokens: sub-layers {', '.join(map(str, kept))}"
    if len(fits) < num_sublayers:
        line += f"; {num_sublayers - len(fits)} without a LayerNorm to fit (after the last pre-norm layer)"
    return [line]
