"""The fake (meta) impls of the op pairs the Triton and the extension backends expose:

  forward(students, teachers, masks, power, eps) -> (losses (L,), dim_stats (L, F, max d))
  forward_and_grad(..., grad_losses, group_bytes) -> (losses, dim_stats, dS)   (ext, CPU)
  backward(grad_losses, students, teachers, masks, dim_stats, need_teacher_grad) -> (dS, dT)

so ``torch.compile`` and fake tensors trace them. The ops are not differentiable themselves:
:mod:`eofd_kernels.layer_losses` wires every backend into autograd the same way.
"""

from __future__ import annotations

import torch

from .. import layout

__all__ = ["fake_backward", "fake_forward", "fake_forward_and_grad"]


def fake_forward(students, teachers, masks, power, eps):
    wide = any(x.dtype == torch.float64 for x in students + teachers)
    max_d = max(s.shape[-1] for s in students)
    losses = students[0].new_empty(len(students), dtype=torch.float64 if wide else torch.float32)
    dim_stats = students[0].new_empty((len(students), layout.DIM_FIELDS, max_d),
                                      dtype=torch.float64)
    return losses, dim_stats


def fake_forward_and_grad(students, teachers, masks, power, eps, grad_losses, group_bytes):
    losses, dim_stats = fake_forward(students, teachers, masks, power, eps)
    return losses, dim_stats, [s.new_empty(s.shape) for s in students]


def fake_backward(grad_losses, students, teachers, masks, dim_stats, need_teacher_grad):
    # Contiguous whatever the inputs' strides: the kernels write gradient rows d apart.
    d_teachers = [t.new_empty(t.shape) for t in teachers] if need_teacher_grad else []
    return [s.new_empty(s.shape) for s in students], d_teachers
