"""``backend="ext"``: the compiled extension's ops (schemas in csrc/eofd_ops.cpp), made
traceable (fake impls) and differentiable (autograd) here."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor

from ..inputs import LayerBatch
from .ext_loader import load_error
from .grad_ahead import GradAhead, layer_losses_with_grad_ahead
from .op_autograd import (
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
    """S and T bytes per group of layers of the CPU training forward (csrc/cpu/schedule.h):
    a quarter of the L3 cache, so a group's T is still cached when its gradient chunks reread
    it; 1 (a layer per group) where sysfs does not give the L3 size."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return 1
    units = {"K": 2 ** 10, "M": 2 ** 20}
    l3_bytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return max(1, l3_bytes // 4)


def _forward_and_grad(students, teachers, masks, power, eps, grads):
    return torch.ops.eofd_ext.forward_and_grad(students, teachers, masks, power, eps, grads,
                                               grad_group_bytes())


def _takes_grad_ahead(students: list[Tensor], teachers: list[Tensor]) -> bool:
    """An eager CPU training call with a frozen teacher: the forward can write dS."""
    return (students[0].device.type == "cpu" and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and any(s.requires_grad for s in students)
            and not any(t.requires_grad for t in teachers)
            and not any(torch._subclasses.fake_tensor.is_fake(s) for s in students))


def layer_losses_ext(batch: LayerBatch, power: float, eps: float,
                     grad_ahead: GradAhead | None = None) -> Tensor:
    """Per-layer losses ``(L,)`` from the compiled kernels (S and T in one common dtype).

    With a ``grad_ahead`` forecast, eager CPU training calls write dS in the forward."""
    layers = promote_layers(batch.students + batch.teachers)
    students, teachers = layers[:batch.num_layers], layers[batch.num_layers:]
    if grad_ahead is not None and _takes_grad_ahead(students, teachers):
        return layer_losses_with_grad_ahead(_forward_and_grad, torch.ops.eofd_ext.backward,
                                            grad_ahead, students, teachers, batch.masks,
                                            power, eps)
    return torch.ops.eofd_ext.forward(students, teachers, batch.masks, power, eps)[0]
