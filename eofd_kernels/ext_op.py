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
    fake_forward_and_unit_grad,
    promote_layers,
    register_eofd_autograd,
)

__all__ = ["layer_losses_ext"]

if load_error() is not None:
    raise ImportError(load_error())

torch.library.register_fake("eofd_ext::forward")(fake_forward)
torch.library.register_fake("eofd_ext::forward_and_unit_grad")(fake_forward_and_unit_grad)
torch.library.register_fake("eofd_ext::backward")(fake_backward)
register_eofd_autograd("eofd_ext::forward", torch.ops.eofd_ext.backward)


def layer_losses_ext(batch: LayerBatch, power: float, eps: float) -> Tensor:
    """Per-layer losses ``(L,)`` from the compiled kernels (S and T in one common dtype)."""
    layers = promote_layers(batch.students + batch.teachers)
    num_layers = batch.num_layers
    # CPU only: there the layer is still in L3 for the unit-grad pass (csrc/cpu/eofd_cpu.cpp);
    # a GPU gains nothing from it unmeasured, so CUDA keeps DESIGN §3's separate backward.
    unit_grad_op = (torch.ops.eofd_ext.forward_and_unit_grad if layers[0].device.type == "cpu"
                    else None)
    return differentiable_layer_losses(torch.ops.eofd_ext.forward, torch.ops.eofd_ext.backward,
                                       layers[:num_layers], layers[num_layers:], batch.masks,
                                       power, eps, unit_grad_op)
