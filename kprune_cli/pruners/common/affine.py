"""The affine variant of a reconstruction fit: re-fit the output bias together with the weights.

The plain fit ``min_W ||A·W − R||²`` (``A`` ``(n, k)``, ``R`` ``(n, d)`` with ``R = Y − X − b``)
keeps the bias ``b``. The affine fit ``min_{W, c} ||A·W + 1·cᵀ − R||²`` has, for any ``W``, the
best offset ``c = mean(R) − Wᵀ·mean(A)``; substituting it leaves least squares on the centred
data, whose normal equations follow from the plain ones and the column sums:

    gram_c = AᵀA − n·ā·āᵀ          rhs_c = AᵀR − n·ā·r̄ᵀ          (ā = Σ A / n, r̄ = Σ R / n)

The new bias is ``b + c = b + r̄ − Wᵀ·ā``: with no column left (``k = 0``) it is ``b + r̄ = mean(Y − X)``,
the best constant output of the sub-layer, instead of a stale bias.
"""

from __future__ import annotations

import torch


def centred(gram: torch.Tensor, rhs: torch.Tensor, a_sum: torch.Tensor, residual_sum: torch.Tensor,
            tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The centred normal equations ``(gram_c (k, k), rhs_c (k, d))`` from ``gram`` ``(k, k)``,
    ``rhs`` ``(k, d)``, ``a_sum`` ``(k,)``, ``residual_sum`` ``(d,)`` over ``tokens`` rows (float64).
    With no tokens the system is returned as it is."""
    if tokens == 0:
        return gram, rhs
    return (gram - torch.outer(a_sum, a_sum) / tokens,
            rhs - torch.outer(a_sum, residual_sum) / tokens)


def refit_bias(bias: torch.Tensor, solution: torch.Tensor, a_sum: torch.Tensor, residual_sum: torch.Tensor,
               tokens: int) -> torch.Tensor:
    """The affine fit's bias ``(d,)``: ``bias + (residual_sum − solutionᵀ·a_sum) / tokens``, with
    ``bias`` ``(d,)`` the one ``R`` was built with, ``solution`` ``(k, d)`` the centred fit's weights
    (one row per column of ``A``) and the sums as in :func:`centred`. ``bias`` unchanged without tokens."""
    if tokens == 0:
        return bias
    offset = (residual_sum - solution.double().T @ a_sum.double()) / tokens
    return (bias.double() + offset).to(bias.dtype)
