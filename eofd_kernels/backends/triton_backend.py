"""``backend="triton"``: the fused kernels (triton_kernels) as ``torch.library`` custom ops.

``custom_op`` (not ``triton_op``) because it is the registration that works in eager mode,
under ``torch.compile(fullgraph=True)`` and ``opcheck`` alike, also when Triton runs through
its CPU interpreter (docs/design.md, "Registration").
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import triton_kernels as kernels
from .base import Backend, in_own_dtypes, kernel_sides
from .op_fakes import fake_backward, fake_forward

__all__ = ["TritonBackend", "triton_backward", "triton_forward"]


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


class TritonBackend(Backend):
    """Each side in its own dtype (the kernels read the student's and the teacher's element
    types separately); the layers of one side in one common dtype."""

    name = "triton"

    def forward(self, batch, power, eps):
        return triton_forward(*kernel_sides(batch), batch.masks, power, eps)

    def backward(self, grad_losses, batch, dim_stats, need_teacher_grad, power):
        d_students, d_teachers = triton_backward(grad_losses, *kernel_sides(batch), batch.masks,
                                                 dim_stats, need_teacher_grad)
        return in_own_dtypes(d_students, batch.students), in_own_dtypes(d_teachers, batch.teachers)
