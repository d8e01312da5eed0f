"""What the Triton and the extension ops share: fake impls and the autograd formula.

Both backends expose the same pair of ops:
  forward(students, teachers, masks, power, eps) -> (losses (L,), dim_stats (L, F, max d))
  backward(grad_losses, students, teachers, masks, dim_stats, need_teacher_grad) -> (dS, dT)
so one ``register_eofd_autograd`` wires either pair into autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import layout

__all__ = ["fake_backward", "fake_forward", "promote_layers", "register_eofd_autograd"]


def fake_forward(students, teachers, masks, power, eps):
    wide = any(x.dtype == torch.float64 for x in students + teachers)
    max_d = max(s.shape[1] for s in students)
    losses = students[0].new_empty(len(students), dtype=torch.float64 if wide else torch.float32)
    dim_stats = students[0].new_empty((len(students), layout.DIM_FIELDS, max_d),
                                      dtype=torch.float64)
    return losses, dim_stats


def fake_backward(grad_losses, students, teachers, masks, dim_stats, need_teacher_grad):
    d_teachers = [torch.empty_like(t) for t in teachers] if need_teacher_grad else []
    return [torch.empty_like(s) for s in students], d_teachers


def register_eofd_autograd(forward_op, backward_op) -> None:
    """Make ``forward_op`` differentiable in S and T through ``backward_op``."""

    def setup_context(ctx, inputs, output):
        students, teachers, masks, _power, _eps = inputs
        ctx.num_layers = len(students)
        ctx.mask_layers = [i for i, m in enumerate(masks) if m is not None]
        ctx.need_teacher_grad = any(t.requires_grad for t in teachers)
        ctx.save_for_backward(*students, *teachers, *(masks[i] for i in ctx.mask_layers),
                              output[1])

    def backward(ctx, grad_losses, _grad_dim_stats):
        saved = ctx.saved_tensors
        num_layers = ctx.num_layers
        students, teachers = list(saved[:num_layers]), list(saved[num_layers:2 * num_layers])
        masks = [None] * num_layers
        for i, m in zip(ctx.mask_layers, saved[2 * num_layers:-1]):
            masks[i] = m
        d_students, d_teachers = backward_op(grad_losses, students, teachers, masks, saved[-1],
                                             ctx.need_teacher_grad)
        if not ctx.need_teacher_grad:
            d_teachers = [None] * num_layers
        # custom ops match the grads' structure against the inputs', where a list of optional
        # tensors holding a None counts as one leaf.
        d_masks = [None] * num_layers if len(ctx.mask_layers) == num_layers else None
        return d_students, d_teachers, d_masks, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def promote_layers(layers: list[Tensor]) -> list[Tensor]:
    """One dtype for all ``layers`` (kernels read one dtype per side); a no-op when they agree."""
    dtype = layers[0].dtype
    for x in layers[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.to(dtype) for x in layers]
