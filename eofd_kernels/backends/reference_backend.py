"""``backend="reference"``: the paper's code (:mod:`eofd_kernels.reference`) per layer.

The oracle, not a production path: its std is ``torch.std`` in the inputs' dtype, its
gradients are autograd's through the paper's code. It runs the paper's formula on every path
it takes and refuses the others (split batches, given weights, the fused projection, eps),
which the paper's code does not have, with an error that says so.
"""

from __future__ import annotations

import torch

from ..inputs import LayerBatch
from ..reference import masked_reference_losses
from .base import Backend

__all__ = ["ReferenceBackend"]


def _refuse(what: str):
    raise ValueError(f"backend='reference' (the paper's code) has no {what}; use "
                     "backend='torch' or 'auto'")


class ReferenceBackend(Backend):
    name = "reference"

    def differentiable_losses(self, batch, power, eps, weights=None):
        if eps != 0.0:
            raise ValueError(f"eps: the reference (the paper's code) has no eps, got eps={eps}")
        if weights is not None:
            _refuse("given weights (weights=)")
        losses = masked_reference_losses(batch.students, batch.teachers, batch.masks, power)
        return losses.to(batch.result_dtype)

    def forward(self, batch, power, eps):
        with torch.no_grad():
            losses = self.differentiable_losses(batch, power, eps)
        # The backward differentiates the paper's code again: no statistics to keep.
        return losses, losses.new_empty(0, dtype=torch.float64)

    def backward(self, grad_losses, batch, dim_stats, need_teacher_grad, power):
        students = [s.detach().requires_grad_() for s in batch.students]
        teachers = [t.detach().requires_grad_(need_teacher_grad) for t in batch.teachers]
        with torch.enable_grad():
            losses = self.differentiable_losses(LayerBatch(students, teachers, batch.masks),
                                                power, 0.0)
            grads = torch.autograd.grad(losses, students + (teachers if need_teacher_grad
                                                             else []),
                                        grad_losses.to(losses.dtype))
        num_layers = batch.num_layers
        return list(grads[:num_layers]), list(grads[num_layers:])

    def moments(self, batch):
        _refuse("per-dim moments (process_group=, weights=, outlier scans)")

    def teacher_stats(self, teachers, power, eps):
        _refuse("fused projection (eofd_projected_loss); project first and call eofd_loss")
