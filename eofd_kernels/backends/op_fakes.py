"""What the Triton and the extension op pairs share: fake impls and one autograd formula.

Both backends expose the same pair of ops:
  forward(students, teachers, masks, power, eps) -> (losses (L,), dim_stats (L, F, max d))
  backward(grad_losses, students, teachers, masks, dim_stats, need_teacher_grad) -> (dS, dT)
and :func:`register_eofd_autograd` wires either pair into autograd, for eager calls and
``torch.compile`` alike. A backward asked for a graph of its own (``create_graph=True``: a
gradient penalty, grad-of-grad) recomputes the gradients differentiably with the torch
backend's ops instead of the kernels, so second derivatives are exact, never silently dropped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import layout
from ..inputs import LayerBatch
from .torch_backend import layer_losses_torch

__all__ = ["differentiable_grads", "fake_backward", "fake_forward", "fake_forward_and_grad",
           "promote_layers", "register_eofd_autograd", "saved_layers", "save_layers"]


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


def save_layers(ctx, students, teachers, masks, dim_stats, power: float, eps: float,
                need_teacher_grad: bool) -> None:
    """Saves what the backward needs; S and T are saved tensors, so changing them in place
    before the backward is a version-counter error, whichever path the backward takes."""
    ctx.num_layers = len(students)
    ctx.mask_layers = [i for i, m in enumerate(masks) if m is not None]
    ctx.power, ctx.eps, ctx.need_teacher_grad = power, eps, need_teacher_grad
    ctx.save_for_backward(*students, *teachers, *(masks[i] for i in ctx.mask_layers), dim_stats)


def saved_layers(ctx) -> tuple[list[Tensor], list[Tensor], list[Tensor | None], Tensor]:
    """``(students, teachers, masks, dim_stats)`` as :func:`save_layers` saved them."""
    saved = ctx.saved_tensors
    num_layers = ctx.num_layers
    students, teachers = list(saved[:num_layers]), list(saved[num_layers:2 * num_layers])
    masks = [None] * num_layers
    for i, m in zip(ctx.mask_layers, saved[2 * num_layers:-1]):
        masks[i] = m
    return students, teachers, masks, saved[-1]


def differentiable_grads(ctx, students, teachers, masks, grad_losses):
    """dS and dT (None when frozen) as differentiable functions of S, T and the incoming
    grads: the torch backend's formula (the same math and numerics as the kernels)."""
    losses = layer_losses_torch(LayerBatch(students, teachers, masks), ctx.power, ctx.eps)
    inputs = students + (teachers if ctx.need_teacher_grad else [])
    grads = torch.autograd.grad(losses, inputs, grad_losses.to(losses.dtype), create_graph=True)
    d_teachers = list(grads[ctx.num_layers:]) if ctx.need_teacher_grad else None
    return list(grads[:ctx.num_layers]), d_teachers or [None] * ctx.num_layers


def op_grads(ctx, backward_op, grad_losses):
    """dS per layer, and dT per layer (None for each when the teacher is frozen)."""
    students, teachers, masks, dim_stats = saved_layers(ctx)
    if torch.is_grad_enabled():  # backward(create_graph=True)
        return differentiable_grads(ctx, students, teachers, masks, grad_losses)
    d_students, d_teachers = backward_op(grad_losses, students, teachers, masks, dim_stats,
                                         ctx.need_teacher_grad)
    return d_students, d_teachers if ctx.need_teacher_grad else [None] * ctx.num_layers


def register_eofd_autograd(forward_op, backward_op) -> None:
    """Make ``forward_op`` differentiable in S and T through ``backward_op``."""

    def setup_context(ctx, inputs, output):
        students, teachers, masks, power, eps = inputs
        save_layers(ctx, students, teachers, masks, output[1], power, eps,
                    any(t.requires_grad for t in teachers))

    def backward(ctx, grad_losses, _grad_dim_stats):
        d_students, d_teachers = op_grads(ctx, backward_op, grad_losses)
        # custom ops match the grads' structure against the inputs', where a list of optional
        # tensors holding a None counts as one leaf.
        d_masks = [None] * ctx.num_layers if len(ctx.mask_layers) == ctx.num_layers else None
        return d_students, d_teachers, d_masks, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def promote_layers(layers: list[Tensor]) -> list[Tensor]:
    """One dtype for all ``layers`` (kernels read one dtype per side); a no-op when they agree."""
    dtype = layers[0].dtype
    if all(x.dtype == dtype for x in layers):
        return layers
    for x in layers[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.to(dtype) for x in layers]
