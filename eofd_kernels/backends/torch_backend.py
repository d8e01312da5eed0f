"""``backend="torch"``: the statistics pass and the backward in plain PyTorch ops.

Always available, on any device. Its statistics pass computes the moments with the kernels'
numerics (fp32, fp64 for fp64 inputs, pivoted two-pass: :mod:`eofd_kernels.formula`) and the
one Python finalize (:func:`eofd_kernels.moments.finalize`) turns them into the losses and
``dim_stats``; the backward forms dS and dT from ``dim_stats`` like the kernels do. No host
syncs, no copies of Python numbers.
"""

from __future__ import annotations

import torch

from .. import layout
from ..formula import masked_difference, pivoted_deviations
from ..inputs import LayerBatch
from ..layout import as_rows
from ..moments import finalize
from .base import Backend

__all__ = ["TorchBackend"]


class TorchBackend(Backend):
    name = "torch"

    @torch.no_grad()
    def moments(self, batch: LayerBatch) -> torch.Tensor:
        max_d = max(t.shape[-1] for t in batch.teachers)
        moments = torch.zeros(batch.num_layers, layout.MOMENT_FIELDS, max_d,
                              dtype=torch.float64, device=batch.teachers[0].device)
        acc = batch.result_dtype
        for i, (s, t, m) in enumerate(zip(batch.students, batch.teachers, batch.masks)):
            rows_t = as_rows(t).to(acc)
            d = rows_t.shape[1]
            deviations, n_valid, pivot, offset = pivoted_deviations(rows_t, m)
            diff = masked_difference(as_rows(s), rows_t, m, acc)
            moments[i, layout.M_COUNT, :d] = n_valid  # a Python int fills without a copy
            for field, value in ((layout.M_PIVOT, pivot[0]), (layout.M_PIVOT_OFFSET, offset),
                                 (layout.M_M2, deviations.square().sum(dim=0)),
                                 (layout.M_SQUARED_ERROR, diff.square().sum(dim=0))):
                moments[i, field, :d] = value
        return moments

    def forward(self, batch, power, eps):
        dims = [t.shape[-1] for t in batch.teachers]
        losses, dim_stats = finalize(self.moments(batch), dims, power, eps)
        return losses.to(batch.result_dtype), dim_stats

    @torch.no_grad()
    def backward(self, grad_losses, batch, dim_stats, need_teacher_grad, power):
        d_students, d_teachers = [], []
        for i, (s, t, m) in enumerate(zip(batch.students, batch.teachers, batch.masks)):
            acc = torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32
            rows_s, rows_t = as_rows(s).to(acc), as_rows(t).to(acc)
            stats = dim_stats[i, :, :rows_t.shape[1]].to(acc)
            g = grad_losses[i].to(acc)
            d_s = g * stats[layout.D_COEF_S] * (rows_s - rows_t)
            if m is not None:
                d_s = torch.where(m[:, None], d_s, 0.0)
            d_students.append(d_s.to(s.dtype).reshape(s.shape))
            if need_teacher_grad:
                deviation = (rows_t - stats[layout.D_PIVOT]) - stats[layout.D_PIVOT_OFFSET]
                d_t = g * stats[layout.D_COEF_T] * deviation - d_s
                if m is not None:
                    d_t = torch.where(m[:, None], d_t, 0.0)
                d_teachers.append(d_t.to(t.dtype).reshape(t.shape))
        return d_students, d_teachers
