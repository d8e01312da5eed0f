"""The EOFD loss as differentiable torch ops, with the kernels' numerics.

What runs where the kernels cannot: ``torch.func`` transforms (vmap, grad), a backward that
builds a graph (``create_graph=True``: gradient penalties, grad-of-grad) for every backend but
the reference. fp32 (fp64 for fp64 inputs) accumulation and a pivoted two-pass std, so outlier
dims with |mean| >> std keep their digits; the degenerate cases follow
:mod:`eofd_kernels.moments`' rule. No host syncs: the pivot row is found with ``argmax``, and
masked tokens are selected with ``where``, never multiplied by 0, so NaN or Inf in padding
cannot reach the loss or a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .inputs import LayerBatch
from .layout import as_rows

__all__ = ["layer_losses", "masked_difference", "pivoted_deviations"]


def pivoted_deviations(teacher: Tensor, valid: Tensor | None):
    """Per-dim deviations from the mean of ``teacher`` ``(n, d)`` over the valid tokens.

    Returns ``(deviations (n, d) with 0 on masked rows, n_valid (0-dim or int), pivot (1, d),
    pivot offset (d,))``, the mean being ``pivot + offset``. Every value is shifted by one
    actual valid row (the pivot) before the two-pass mean: the shift is exact for outlier dims
    (Sterbenz), so the mean keeps the digits that ``teacher.std()`` in fp32 loses.
    """
    if valid is None:
        pivot = teacher[:1].detach()
        shifted = teacher - pivot
        offset = shifted.mean(dim=0)
        return shifted - offset, teacher.shape[0], pivot, offset
    keep = valid[:, None]
    n_valid = valid.sum().to(teacher.dtype)
    first_valid = valid.to(torch.uint8).argmax().reshape(1)
    pivot = teacher.index_select(0, first_valid).detach()
    shifted = torch.where(keep, teacher - pivot, 0.0)
    offset = shifted.sum(dim=0) / n_valid
    return torch.where(keep, shifted - offset, 0.0), n_valid, pivot, offset


def masked_difference(student: Tensor, teacher: Tensor, valid: Tensor | None,
                      acc: torch.dtype) -> Tensor:
    """``S - T`` of ``(n, d)`` rows in ``acc``, 0 on masked rows: selected, before anything
    squares it (square's backward would multiply a NaN in the padding by 0)."""
    diff = student.to(acc) - teacher.to(acc)
    return diff if valid is None else torch.where(valid[:, None], diff, 0.0)


def _sigma(deviations: Tensor, n_valid) -> Tensor:
    """Unbiased std per dim. A constant dim (M2 = 0) gets sigma 0 with a zero derivative:
    its deviations are all 0, so any finite slope gives the same dT, and 0 keeps sqrt's
    infinite slope at 0 from turning into 0 * inf = NaN. A NaN M2 stays NaN."""
    m2 = deviations.square().sum(dim=0)
    constant = m2 == 0
    zero = 0.0 / (n_valid - 1)  # NaN when n' = 1, as in the reference (n' - 1 = 0)
    return torch.where(constant, zero, (torch.where(constant, 1.0, m2) / (n_valid - 1)).sqrt())


def _weights(sigma: Tensor, power: float, eps: float) -> Tensor:
    """``(sigma / (sbar + eps)) ** p``. A zero sigma gets ``0 ** p`` without differentiating
    pow at 0 — unless sbar + eps = 0 (a wholly constant layer at eps = 0), where every weight
    is 0 / 0 = NaN, as in the paper's code."""
    scale = sigma.mean() + eps
    ratio = sigma / scale
    zero = sigma == 0
    zero_base = torch.where(scale > 0, 0.0, torch.nan).to(sigma.dtype).expand_as(sigma)
    return torch.where(zero, zero_base ** power, torch.where(zero, 1.0, ratio) ** power)


def _layer_loss(student, teacher, valid, power: float, eps: float, weight, acc: torch.dtype):
    teacher = teacher.to(acc)
    deviations, n_valid, _, _ = pivoted_deviations(teacher, valid)
    diff = masked_difference(student, teacher, valid, acc)
    if weight is None:
        weight, divisor = _weights(_sigma(deviations, n_valid), power, eps), n_valid
    else:  # given weights: no statistics needed, and an empty layer contributes 0
        weight = weight.to(acc)
        divisor = n_valid.clamp_min(1) if isinstance(n_valid, Tensor) else n_valid
    return (weight * diff.square().sum(dim=0)).sum() / (divisor * teacher.shape[1])


def layer_losses(batch: LayerBatch, power: float, eps: float,
                 weights: list[Tensor] | None = None) -> Tensor:
    """Per-layer losses ``(L,)`` in ``batch.result_dtype``, differentiable in S, T (and in
    given ``weights``, one ``(d,)`` tensor per layer, used instead of the teacher's)."""
    acc = batch.result_dtype
    weights = [None] * batch.num_layers if weights is None else weights
    return torch.stack([
        _layer_loss(as_rows(s), as_rows(t), m, power, eps, w, acc)
        for s, t, m, w in zip(batch.students, batch.teachers, batch.masks, weights)
    ])
