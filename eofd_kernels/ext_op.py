"""``backend="ext"``: the compiled extension's ops (schemas in csrc/eofd_ops.cpp), made
traceable (fake impls) and differentiable (autograd) here."""

from __future__ import annotations

import torch
from torch import Tensor

from .ext_loader import load_error
from .inputs import LayerBatch
from .op_registration import (
    differentiable_layer_losses,
    fake_backward,
    fake_forward,
    promote_layers,
    register_eofd_autograd,
)

__all__ = ["layer_losses_ext"]

if load_error() is not None:
    raise ImportError(load_error())

torch.library.register_fake("eofd_ext::forward")(fake_forward)
torch.library.register_fake("eofd_ext::backward")(fake_backward)
register_eofd_autograd("eofd_ext::forward", torch.ops.eofd_ext.backward)


def layer_losses_ext(batch: LayerBatch, power: float, eps: float) -> Tensor:
    """Per-layer losses ``(L,)`` from the compiled kernels (S and T in one common dtype)."""
    layers = promote_layers(batch.students + batch.teachers)
    num_layers = batch.num_layers
    return differentiable_layer_losses(torch.ops.eofd_ext.forward, torch.ops.eofd_ext.backward,
                                       layers[:num_layers], layers[num_layers:], batch.masks,
                                       power, eps)
