"""The CPU training step that writes dS in the forward, and the forecast it needs.

The extension's ``forward_and_grad`` op (CPU) computes, next to the losses, dS for incoming
grads given in advance, while a group of layers is still in the cache: a training step then
reads S and T from memory once instead of twice (docs/design.md, "The CPU training step").
The grads come from a :class:`GradAhead` the caller holds (``EOFDLoss`` and
``DistillationLoss`` each own one): a loop repeats its step, so the grads its last backward
brought (1, a loss weight, 1 / the accumulation steps) forecast the next. The backward hands
the forward's dS out when the forecast was right and otherwise runs the backward op, so the
bits are the backward op's either way; a miss only costs the wasted dS write.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .op_autograd import differentiable_grads, save_layers, saved_layers

__all__ = ["GradAhead", "layer_losses_with_grad_ahead"]


class GradAhead:
    """A forecast of the per-layer grads the next backward of a loss will bring.

    Owned by the object a training loop calls every step (``EOFDLoss``, ``DistillationLoss``);
    the functional ``eofd_loss`` has none and runs the plain forward and backward ops.
    """

    def __init__(self) -> None:
        self._grads: Tensor | None = None

    def forecast(self, num_layers: int) -> Tensor:
        """The last observed grads of ``num_layers`` layers, else ones (a loss backwarded as
        is), float64 on the CPU."""
        if self._grads is None or self._grads.shape != (num_layers,):
            return torch.ones(num_layers, dtype=torch.float64)
        return self._grads

    def observe(self, grads: Tensor) -> None:
        self._grads = grads.detach().to("cpu", torch.float64, copy=True)

    def __repr__(self) -> str:
        seen = None if self._grads is None else self._grads.tolist()
        return f"GradAhead(last grads={seen})"


class _LayerLossesWithGradAhead(torch.autograd.Function):
    """apply(forward_and_grad_op, backward_op, grad_ahead, power, eps, L, *students,
    *teachers, *masks) -> (L,) losses, for a frozen teacher. ctx keeps the forward's dS (not
    as saved tensors: they become the returned grads) for the backward to hand out once."""

    @staticmethod
    def forward(ctx, forward_and_grad_op, backward_op, grad_ahead, power, eps, num_layers,
                *layers):
        students = list(layers[:num_layers])
        teachers = list(layers[num_layers:2 * num_layers])
        masks = list(layers[2 * num_layers:])
        ctx.expected = grad_ahead.forecast(num_layers)
        losses, dim_stats, ctx.early_grads = forward_and_grad_op(students, teachers, masks,
                                                                 power, eps, ctx.expected)
        ctx.backward_op, ctx.grad_ahead = backward_op, grad_ahead
        save_layers(ctx, students, teachers, masks, dim_stats, power, eps, False)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        # Unpacking first: S or T changed in place since the forward is an error on every path.
        students, teachers, masks, dim_stats = saved_layers(ctx)
        early, ctx.early_grads = ctx.early_grads, None  # a retained graph's 2nd backward recomputes
        if torch.is_grad_enabled():  # backward(create_graph=True)
            d_students, _ = differentiable_grads(ctx, students, teachers, masks, grad_losses)
        elif early is not None and torch.equal(grad_losses.to("cpu", torch.float64),
                                               ctx.expected):
            d_students = early
        else:
            ctx.grad_ahead.observe(grad_losses)
            d_students, _ = ctx.backward_op(grad_losses, students, teachers, masks, dim_stats,
                                            False)
        return (None,) * 6 + (*d_students,) + (None,) * (2 * ctx.num_layers)


def layer_losses_with_grad_ahead(forward_and_grad_op, backward_op, grad_ahead: GradAhead,
                                 students, teachers, masks, power: float, eps: float) -> Tensor:
    """Per-layer losses ``(L,)``, differentiable in S (the teacher must be frozen).

    ``forward_and_grad_op(students, teachers, masks, power, eps, grads)`` ->
    ``(losses, dim_stats, dS for grads)``; ``backward_op`` is the pair's plain backward.
    """
    return _LayerLossesWithGradAhead.apply(forward_and_grad_op, backward_op, grad_ahead, power,
                                           eps, len(students), *students, *teachers, *masks)
