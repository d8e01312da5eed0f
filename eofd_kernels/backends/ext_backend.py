"""``backend="ext"``: the compiled extension's ops (schemas in csrc/eofd_ops.cpp), with their
fake impls registered here so ``torch.compile`` traces them."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .base import Backend, in_own_dtypes, kernel_sides
from .ext_loader import load_error
from .op_fakes import fake_backward, fake_forward, fake_forward_and_grad

__all__ = ["ExtBackend"]

if load_error() is not None:
    raise ImportError(load_error())

torch.library.register_fake("eofd_ext::forward")(fake_forward)
torch.library.register_fake("eofd_ext::forward_and_grad")(fake_forward_and_grad)
torch.library.register_fake("eofd_ext::backward")(fake_backward)


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


class ExtBackend(Backend):
    """Each side in its own dtype, as the Triton backend (docs/design.md, "Numerics")."""

    name = "ext"

    def forward(self, batch, power, eps):
        students, teachers = kernel_sides(batch)
        return torch.ops.eofd_ext.forward(students, teachers, batch.masks, power, eps)

    def backward(self, grad_losses, batch, dim_stats, need_teacher_grad, power):
        students, teachers = kernel_sides(batch)
        d_students, d_teachers = torch.ops.eofd_ext.backward(
            grad_losses, students, teachers, batch.masks, dim_stats, need_teacher_grad)
        return in_own_dtypes(d_students, batch.students), in_own_dtypes(d_teachers, batch.teachers)

    def offers_forward_and_grad(self, batch):
        """An eager CPU training call with a frozen teacher: the forward can write dS while
        a group of layers is still in the cache (docs/design.md, "The CPU training step")."""
        students, teachers = batch.students, batch.teachers
        return (students[0].device.type == "cpu" and not torch.compiler.is_compiling()
                and not any(t.requires_grad for t in teachers)
                and not any(torch._subclasses.fake_tensor.is_fake(s) for s in students))

    def forward_and_grad(self, batch, power, eps, grads):
        students, teachers = kernel_sides(batch)
        losses, dim_stats, d_students = torch.ops.eofd_ext.forward_and_grad(
            students, teachers, batch.masks, power, eps, grads, grad_group_bytes())
        return losses, dim_stats, in_own_dtypes(d_students, batch.students)
