"""``backend="torch"``: the EOFD loss in plain PyTorch ops, differentiated by autograd.

Always available, on any device. It follows DESIGN §1 to the letter (masks, eps, the teacher
gradient through the weights) and uses the same numerics as the fused kernels: fp32 (fp64 for
fp64 inputs) accumulation and a pivoted two-pass std, so outlier dimensions with
|mean| >> std keep every digit. No host syncs: the pivot row is found with ``argmax``.
"""

from __future__ import annotations

import torch

from .inputs import LayerBatch
from .layout import as_rows

__all__ = ["layer_losses_torch", "layer_weights_torch"]


def _pivoted_std(teacher: torch.Tensor, valid: torch.Tensor | None):
    """Per-dimension unbiased std of ``teacher`` ``(n, d)`` over the valid tokens.

    Returns ``(sigma (d,), n_valid (0-dim))``. Every value is shifted by one actual valid row
    (the pivot) before the two-pass mean/M2: the shift is exact for outlier dims
    (Sterbenz), so the mean keeps the digits that ``teacher.std()`` in fp32 would lose.
    """
    if valid is None:
        n_valid = torch.tensor(teacher.shape[0], dtype=teacher.dtype, device=teacher.device)
        pivot = teacher[:1].detach()
        shifted = teacher - pivot
        centred = shifted - shifted.mean(dim=0)
    else:
        weight = valid.to(teacher.dtype)[:, None]
        n_valid = weight.sum()
        first_valid = valid.to(torch.uint8).argmax().reshape(1)
        pivot = teacher.index_select(0, first_valid).detach()
        shifted = (teacher - pivot) * weight
        centred = (shifted - shifted.sum(dim=0) / n_valid) * weight
    sigma = (centred.square().sum(dim=0) / (n_valid - 1)).sqrt()
    return sigma, n_valid


def _weights(sigma: torch.Tensor, power: float, eps: float) -> torch.Tensor:
    return (sigma / (sigma.mean() + eps)) ** power


def _layer_loss(student, teacher, valid, power: float, eps: float, acc: torch.dtype):
    teacher = teacher.to(acc)
    sigma, n_valid = _pivoted_std(teacher, valid)
    weights = _weights(sigma, power, eps)
    sq_err = (student.to(acc) - teacher).square()
    if valid is not None:
        sq_err = sq_err * valid.to(acc)[:, None]
    return (weights * sq_err.sum(dim=0)).sum() / (n_valid * teacher.shape[1])


def layer_losses_torch(batch: LayerBatch, power: float, eps: float) -> torch.Tensor:
    """Per-layer losses ``(L,)`` in ``batch.result_dtype``."""
    acc = batch.result_dtype
    return torch.stack([
        _layer_loss(as_rows(s), as_rows(t), m, power, eps, acc)
        for s, t, m in zip(batch.students, batch.teachers, batch.masks)
    ])


@torch.no_grad()
def layer_weights_torch(batch: LayerBatch, power: float, eps: float) -> list[torch.Tensor]:
    """The weights ``w_d`` of every layer, ``[(d_l,)]`` in ``batch.result_dtype``."""
    acc = batch.result_dtype
    return [
        _weights(_pivoted_std(as_rows(t).to(acc), m)[0], power, eps)
        for t, m in zip(batch.teachers, batch.masks)
    ]
