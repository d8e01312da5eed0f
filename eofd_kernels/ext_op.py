"""``backend="ext"``: the compiled extension's ops (schemas in csrc/eofd_ops.cpp), made
traceable (fake impls) and differentiable (autograd) here."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor

from .ext_loader import load_error
from .inputs import LayerBatch
from .op_registration import (
    differentiable_layer_losses,
    fake_backward,
    fake_forward,
    fake_forward_and_grad,
    promote_layers,
    register_eofd_autograd,
)

__all__ = ["layer_losses_ext"]

if load_error() is not None:
    raise ImportError(load_error())

torch.library.register_fake("eofd_ext::forward")(fake_forward)
torch.library.register_fake("eofd_ext::forward_and_grad")(fake_forward_and_grad)
torch.library.register_fake("eofd_ext::backward")(fake_backward)
register_eofd_autograd("eofd_ext::forward", torch.ops.eofd_ext.backward)


@functools.cache
def grad_group_bytes() -> int:
    """S and T bytes per group of the CPU forward's gradient pass (csrc/cpu/eofd_cpu.cpp): a
    quarter of the L3 cache, which kept a BERT-base layer at B=8 fp32 (6.3 MB of a 32 MB L3)
    cached between the passes; 0 (the pass is not used) where sysfs does not give the L3
    size."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return 0
    units = {"K": 2 ** 10, "M": 2 ** 20}
    l3_bytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return l3_bytes // 4


def _grad_forward_op(layers: list[Tensor]):
    """The forward that also gives dS, where it pays: CPU tensors whose largest layer fits a
    group (else the gradient pass rereads S and T from memory, and an unexpected incoming
    grad costs a whole extra pass over them). A GPU keeps DESIGN §3's separate backward:
    nothing measured there says this pays. Compiled graphs use the registered autograd, and
    calls without grad mode the plain forward (so they skip the size check too)."""
    if (not torch.is_grad_enabled() or torch.compiler.is_compiling()
            or layers[0].device.type != "cpu"):
        return None
    group_bytes = grad_group_bytes()
    largest = max(2 * s.numel() * s.element_size() for s in layers[:len(layers) // 2])
    if largest > group_bytes:
        return None
    return functools.partial(torch.ops.eofd_ext.forward_and_grad, group_bytes=group_bytes)


def layer_losses_ext(batch: LayerBatch, power: float, eps: float) -> Tensor:
    """Per-layer losses ``(L,)`` from the compiled kernels (S and T in one common dtype)."""
    layers = promote_layers(batch.students + batch.teachers)
    num_layers = batch.num_layers
    return differentiable_layer_losses(torch.ops.eofd_ext.forward, torch.ops.eofd_ext.backward,
                                       layers[:num_layers], layers[num_layers:], batch.masks,
                                       power, eps, _grad_forward_op(layers))
