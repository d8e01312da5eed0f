"""``backend="torch"``: the EOFD loss in plain PyTorch ops, differentiated by autograd.

Always available, on any device, and under every transform (``torch.func``, fake tensors,
double backward). It follows docs/design.md ("The math") to the letter and uses the same
numerics as the fused kernels: fp32 (fp64 for fp64 inputs) accumulation and a pivoted
two-pass std, so outlier dimensions with |mean| >> std keep every digit. No host syncs: the
pivot row is found with ``argmax``. Masked tokens are selected with ``where``, never
multiplied by 0, so NaN or Inf in padding cannot reach the loss or a gradient.
"""

from __future__ import annotations

import torch

from .. import layout
from ..inputs import LayerBatch
from ..layout import as_rows

__all__ = ["backward_torch", "layer_losses_torch", "layer_weights_torch", "masked_difference",
           "teacher_dim_stats_torch"]


def _pivoted_moments(teacher: torch.Tensor, valid: torch.Tensor | None):
    """Per-dimension deviations from the mean of ``teacher`` ``(n, d)`` over the valid tokens.

    Returns ``(centred (n, d) with 0 on masked rows, n_valid (0-dim), pivot (1, d), offset
    (d,))``, the mean being ``pivot + offset``. Every value is shifted by one actual valid row
    (the pivot) before the two-pass mean: the shift is exact for outlier dims (Sterbenz), so
    the mean keeps the digits that ``teacher.std()`` in fp32 loses.
    """
    if valid is None:
        n_valid = torch.tensor(teacher.shape[0], dtype=teacher.dtype, device=teacher.device)
        pivot = teacher[:1].detach()
        shifted = teacher - pivot
        offset = shifted.mean(dim=0)
        return shifted - offset, n_valid, pivot, offset
    keep = valid[:, None]
    n_valid = valid.sum().to(teacher.dtype)
    first_valid = valid.to(torch.uint8).argmax().reshape(1)
    pivot = teacher.index_select(0, first_valid).detach()
    shifted = torch.where(keep, teacher - pivot, 0.0)
    offset = shifted.sum(dim=0) / n_valid
    return torch.where(keep, shifted - offset, 0.0), n_valid, pivot, offset


def _sigma(centred: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """Unbiased std per dim. A constant dim (M2 = 0) gets sigma 0 with a zero derivative
    (docs/design.md, "Degenerate dims"): its deviations are all 0, so any finite slope gives
    the same dT, and 0 keeps sqrt's infinite slope at 0 from turning into 0 * inf = NaN."""
    m2 = centred.square().sum(dim=0)
    positive = m2 > 0
    zero = 0.0 / (n_valid - 1)  # NaN when n' = 1, as in the reference (n' - 1 = 0)
    return torch.where(positive, (torch.where(positive, m2, 1.0) / (n_valid - 1)).sqrt(), zero)


def _weights(sigma: torch.Tensor, power: float, eps: float) -> torch.Tensor:
    """``(sigma / (sbar + eps)) ** p``; a zero sigma gives ``0 ** p`` (1 at p = 0) without
    differentiating pow at 0."""
    ratio = sigma / (sigma.mean() + eps)
    zero = sigma == 0
    return torch.where(zero, torch.zeros_like(ratio) ** power,
                       torch.where(zero, 1.0, ratio) ** power)


def masked_difference(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None,
                      acc: torch.dtype) -> torch.Tensor:
    """``S - T`` of ``(n, d)`` rows in ``acc``, 0 on masked rows: selected, before anything
    squares it (square's backward would multiply a NaN in the padding by 0)."""
    diff = student.to(acc) - teacher.to(acc)
    return diff if valid is None else torch.where(valid[:, None], diff, 0.0)


def _layer_loss(student, teacher, valid, power: float, eps: float, acc: torch.dtype):
    teacher = teacher.to(acc)
    centred, n_valid, _, _ = _pivoted_moments(teacher, valid)
    weights = _weights(_sigma(centred, n_valid), power, eps)
    diff = masked_difference(student, teacher, valid, acc)
    return (weights * diff.square().sum(dim=0)).sum() / (n_valid * teacher.shape[1])


def layer_losses_torch(batch: LayerBatch, power: float, eps: float,
                       grad_ahead=None) -> torch.Tensor:
    """Per-layer losses ``(L,)`` in ``batch.result_dtype`` (``grad_ahead`` is not used)."""
    acc = batch.result_dtype
    return torch.stack([
        _layer_loss(as_rows(s), as_rows(t), m, power, eps, acc)
        for s, t, m in zip(batch.students, batch.teachers, batch.masks)
    ])


@torch.no_grad()
def teacher_dim_stats_torch(batch: LayerBatch, power: float, eps: float) -> torch.Tensor:
    """The teachers' per-dim statistics in the fused ops' layout, ``(L, DIM_FIELDS, max d)``
    float64: count, pivot, mean offset, sigma, weight and the dS coefficient 2 w / (n' d)
    (the fields that need a student, E and the dT coefficient, are 0)."""
    max_d = max(t.shape[-1] for t in batch.teachers)
    stats = torch.zeros(batch.num_layers, layout.DIM_FIELDS, max_d, dtype=torch.float64,
                        device=batch.teachers[0].device)
    for i, (t, m) in enumerate(zip(batch.teachers, batch.masks)):
        rows = as_rows(t).to(batch.result_dtype)
        d = rows.shape[1]
        centred, n_valid, pivot, offset = _pivoted_moments(rows, m)
        sigma = _sigma(centred, n_valid)
        weights = _weights(sigma, power, eps)
        for field, value in ((layout.D_COUNT, n_valid), (layout.D_PIVOT, pivot[0]),
                             (layout.D_PIVOT_OFFSET, offset), (layout.D_SIGMA, sigma),
                             (layout.D_WEIGHT, weights),
                             (layout.D_COEF_S, 2 * weights / (n_valid * d))):
            stats[i, field, :d] = value
    return stats


@torch.no_grad()
def layer_weights_torch(batch: LayerBatch, power: float, eps: float) -> list[torch.Tensor]:
    """The weights ``w_d`` of every layer, ``[(d_l,)]`` in ``batch.result_dtype``."""
    acc = batch.result_dtype
    weights = []
    for t, m in zip(batch.teachers, batch.masks):
        centred, n_valid, _, _ = _pivoted_moments(as_rows(t).to(acc), m)
        weights.append(_weights(_sigma(centred, n_valid), power, eps))
    return weights


@torch.no_grad()
def backward_torch(grad_losses, students, teachers, masks, dim_stats, need_teacher_grad: bool):
    """The fused ops' backward in torch ops, from the same ``dim_stats``: dS per layer, and
    dT per layer when ``need_teacher_grad`` (else ``[]``); 0 on masked rows."""
    d_students, d_teachers = [], []
    for i, (s, t, m) in enumerate(zip(students, teachers, masks)):
        acc = torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32
        rows_s, rows_t = as_rows(s).to(acc), as_rows(t).to(acc)
        stats = dim_stats[i, :, :rows_t.shape[1]].to(acc)
        g = grad_losses[i].to(acc)
        d_s = g * stats[layout.D_COEF_S] * (rows_s - rows_t)
        if m is not None:
            d_s = torch.where(m[:, None], d_s, 0.0)
        d_students.append(d_s.to(s.dtype).reshape(s.shape))
        if need_teacher_grad:
            deviation = (rows_t - stats[layout.D_PIVOT]) - stats[layout.D_PIVOT_OFFSET]
            d_t = g * stats[layout.D_COEF_T] * deviation - d_s
            if m is not None:
                d_t = torch.where(m[:, None], d_t, 0.0)
            d_teachers.append(d_t.to(t.dtype).reshape(t.shape))
    return d_students, d_teachers
