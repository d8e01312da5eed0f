"""The teachers' per-dim statistics alone, from the backend a call would use.

For users of the statistics that need no student: the fused projection (the weights depend on
the teacher alone) and reports. The fused backends run their forward op with the teacher on
both sides (sigma_d comes from their statistics pass; E_d is 0); the torch and reference
backends compute the same fields with the torch backend's pivoted two-pass moments.
"""

from __future__ import annotations

import torch

from ..inputs import LayerBatch
from . import op_pair, pick_backend
from .op_autograd import promote_layers
from .torch_backend import teacher_dim_stats_torch

__all__ = ["teacher_dim_stats"]


@torch.no_grad()
def teacher_dim_stats(batch: LayerBatch, power: float, eps: float, backend: str) -> torch.Tensor:
    """``(L, DIM_FIELDS, max d)`` float64 (layout.py) for ``batch.teachers`` and masks."""
    forward_op, _ = op_pair(pick_backend(backend, batch.teachers[0].device))
    if forward_op is None:
        return teacher_dim_stats_torch(batch, power, eps)
    teachers = promote_layers(batch.teachers)
    return forward_op(teachers, teachers, batch.masks, power, eps)[1]
