"""The public entry points: ``eofd_loss``, ``EOFDLoss`` and ``teacher_weights``."""

from __future__ import annotations

import torch
from torch import nn

from .backends import resolve_backend
from .inputs import check_power_eps, check_reduction, prepare_layers, reduce_layers
from .torch_backend import layer_weights_torch

__all__ = ["EOFDLoss", "eofd_loss", "teacher_weights"]


def eofd_loss(student, teacher, *, power: float = 0.5, mask=None, layer_weights=None,
              reduction: str = "sum", eps: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """EOFD loss over one or several distilled layers (DESIGN §1).

    Args:
        student: ``(..., d)`` tensor, or a sequence of them (one per layer; layers may differ in
            token count and d). Already projected to the teacher's width.
        teacher: the same shapes as ``student``; its gradient flows through the weights too.
        power: p in ``w_d = (sigma_d / (sbar + eps)) ** p``; 0 gives plain MSE.
        mask: None, one tensor of a layer's leading shape (bool or 0/1; applied to every layer
            of that leading shape), or a sequence with one mask (or None) per layer.
        layer_weights: lambda_l per layer (sequence or ``(L,)`` tensor), or None for all ones.
        reduction: ``"sum"`` or ``"mean"`` over layers (0-dim result), or ``"none"`` (``(L,)``).
        eps: added to sbar; 0 is exactly the paper.
        backend: ``"auto"``, ``"triton"``, ``"ext"``, ``"torch"`` or ``"reference"``.

    Returns:
        float32 (float64 when an input is float64) loss.
    """
    batch = prepare_layers(student, teacher, mask)
    power, eps = check_power_eps(power, eps)
    reduction = check_reduction(reduction)
    layer_losses = resolve_backend(backend, batch.teachers[0].device)
    return reduce_layers(layer_losses(batch, power, eps), layer_weights, reduction)


class EOFDLoss(nn.Module):
    """:func:`eofd_loss` as a module: ``forward(student, teacher, mask, layer_weights)``."""

    def __init__(self, power: float = 0.5, reduction: str = "sum", eps: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        self.power, self.eps = check_power_eps(power, eps)
        self.reduction = check_reduction(reduction)
        self.backend = backend

    def forward(self, student, teacher, mask=None, layer_weights=None) -> torch.Tensor:
        return eofd_loss(student, teacher, power=self.power, mask=mask,
                         layer_weights=layer_weights, reduction=self.reduction, eps=self.eps,
                         backend=self.backend)

    def extra_repr(self) -> str:
        return (f"power={self.power}, reduction={self.reduction!r}, eps={self.eps}, "
                f"backend={self.backend!r}")


def teacher_weights(teacher, *, power: float = 0.5, mask=None, eps: float = 0.0):
    """The weights ``w_d`` (no grad): a ``(d,)`` tensor for one layer, else a list of them."""
    power, eps = check_power_eps(power, eps)
    batch = prepare_layers(teacher, teacher, mask)
    weights = layer_weights_torch(batch, power, eps)
    return weights[0] if isinstance(teacher, torch.Tensor) else weights
