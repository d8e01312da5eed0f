"""``backend="triton"``: the fused kernels as ``torch.library`` custom ops with autograd.

``custom_op`` (not ``triton_op``) because it is the registration that works in eager mode,
under ``torch.compile(fullgraph=True)`` and ``opcheck`` alike, also when Triton runs through
its CPU interpreter (DESIGN §3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import triton_kernels as kernels
from .inputs import LayerBatch
from .op_registration import (
    differentiable_layer_losses,
    fake_backward,
    fake_forward,
    promote_layers,
    register_eofd_autograd,
)

__all__ = ["layer_losses_triton"]


@torch.library.custom_op("eofd_kernels::triton_forward", mutates_args=())
def triton_forward(
    students: list[Tensor], teachers: list[Tensor], masks: list[Tensor | None],
    power: float, eps: float,
) -> tuple[Tensor, Tensor]:
    """Per-layer losses ``(L,)`` and per-dim statistics ``(L, DIM_FIELDS, max d)`` float64."""
    return kernels.eofd_forward(students, teachers, masks, power, eps)


@torch.library.custom_op("eofd_kernels::triton_backward", mutates_args=())
def triton_backward(
    grad_losses: Tensor, students: list[Tensor], teachers: list[Tensor],
    masks: list[Tensor | None], dim_stats: Tensor, need_teacher_grad: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """dS per layer and, when ``need_teacher_grad``, dT per layer (else ``[]``)."""
    return kernels.eofd_backward(grad_losses, students, teachers, masks, dim_stats,
                                 need_teacher_grad)


triton_forward.register_fake(fake_forward)
triton_backward.register_fake(fake_backward)
register_eofd_autograd(triton_forward, triton_backward)


def layer_losses_triton(batch: LayerBatch, power: float, eps: float) -> Tensor:
    """Per-layer losses ``(L,)`` from the fused kernels."""
    return differentiable_layer_losses(triton_forward, triton_backward,
                                       promote_layers(batch.students),
                                       promote_layers(batch.teachers), batch.masks, power, eps)
