"""``backend="triton"``: the fused kernels as ``torch.library`` custom ops with autograd.

``custom_op`` (not ``triton_op``) because it is the registration that works in eager mode,
under ``torch.compile(fullgraph=True)`` and ``opcheck`` alike, also when Triton runs through
its CPU interpreter (DESIGN §3). The fake impls give the output shapes without touching data.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import triton_kernels as kernels
from .inputs import LayerBatch

__all__ = ["layer_losses_triton"]


@torch.library.custom_op("eofd_kernels::triton_forward", mutates_args=())
def triton_forward(
    students: list[Tensor], teachers: list[Tensor], masks: list[Tensor | None],
    power: float, eps: float,
) -> tuple[Tensor, Tensor]:
    """Per-layer losses ``(L,)`` and per-dim statistics ``(L, DIM_FIELDS, max d)`` float64."""
    return kernels.eofd_forward(students, teachers, masks, power, eps)


@triton_forward.register_fake
def _(students, teachers, masks, power, eps):
    wide = any(x.dtype == torch.float64 for x in students + teachers)
    max_d = max(s.shape[1] for s in students)
    losses = students[0].new_empty(len(students), dtype=torch.float64 if wide else torch.float32)
    dim_stats = students[0].new_empty((len(students), kernels.DIM_FIELDS, max_d),
                                      dtype=torch.float64)
    return losses, dim_stats


@torch.library.custom_op("eofd_kernels::triton_backward", mutates_args=())
def triton_backward(
    grad_losses: Tensor, students: list[Tensor], teachers: list[Tensor],
    masks: list[Tensor | None], dim_stats: Tensor, need_teacher_grad: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """dS per layer and, when ``need_teacher_grad``, dT per layer (else ``[]``)."""
    return kernels.eofd_backward(grad_losses, students, teachers, masks, dim_stats,
                                 need_teacher_grad)


@triton_backward.register_fake
def _(grad_losses, students, teachers, masks, dim_stats, need_teacher_grad):
    d_teachers = [torch.empty_like(t) for t in teachers] if need_teacher_grad else []
    return [torch.empty_like(s) for s in students], d_teachers


def _setup_context(ctx, inputs, output):
    students, teachers, masks, _power, _eps = inputs
    ctx.num_layers = len(students)
    ctx.mask_layers = [i for i, m in enumerate(masks) if m is not None]
    ctx.need_teacher_grad = any(t.requires_grad for t in teachers)
    ctx.save_for_backward(*students, *teachers, *(masks[i] for i in ctx.mask_layers), output[1])


def _backward(ctx, grad_losses, _grad_dim_stats):
    saved = ctx.saved_tensors
    num_layers = ctx.num_layers
    students, teachers = list(saved[:num_layers]), list(saved[num_layers:2 * num_layers])
    masks = [None] * num_layers
    for i, m in zip(ctx.mask_layers, saved[2 * num_layers:-1]):
        masks[i] = m
    d_students, d_teachers = triton_backward(grad_losses, students, teachers, masks, saved[-1],
                                             ctx.need_teacher_grad)
    if not ctx.need_teacher_grad:
        d_teachers = [None] * num_layers
    # custom_op matches the grads' structure against the inputs', where a list of optional
    # tensors holding a None counts as one leaf.
    d_masks = [None] * num_layers if len(ctx.mask_layers) == num_layers else None
    return d_students, d_teachers, d_masks, None, None


triton_forward.register_autograd(_backward, setup_context=_setup_context)


def _same_dtype(layers: list[Tensor]) -> list[Tensor]:
    """The kernels read one dtype per side; promote the rare call that mixes dtypes."""
    dtype = layers[0].dtype
    for x in layers[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.to(dtype) for x in layers]


def layer_losses_triton(batch: LayerBatch, power: float, eps: float) -> Tensor:
    """Per-layer losses ``(L,)`` from the fused kernels."""
    masks = [None if m is None else m.contiguous() for m in batch.masks]
    losses, _ = triton_forward(_same_dtype(batch.students), _same_dtype(batch.teachers), masks,
                               power, eps)
    return losses
