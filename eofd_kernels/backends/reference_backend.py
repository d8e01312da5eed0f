"""``backend="reference"``: the paper's code (:mod:`eofd_kernels.reference`) per layer."""

from __future__ import annotations

import torch

from ..inputs import LayerBatch
from ..reference import masked_reference_losses

__all__ = ["layer_losses_reference"]


def layer_losses_reference(batch: LayerBatch, power: float, eps: float,
                           grad_ahead=None) -> torch.Tensor:
    """Per-layer losses ``(L,)`` in ``batch.result_dtype``; slow and not numerically hardened
    (its std is ``torch.std`` in the inputs' dtype): the oracle, not a production path."""
    if eps != 0.0:
        raise ValueError(f"eps: the reference (the paper's code) has no eps, got eps={eps}")
    losses = masked_reference_losses(batch.students, batch.teachers, batch.masks, power)
    return losses.to(batch.result_dtype)
