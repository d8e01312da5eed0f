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
    """S and T bytes per group of layers of the CPU forward's gradient pass
    (csrc/cpu/eofd_cpu.cpp): a quarter of the L3 cache, which kept a BERT-base layer's T at
    B=8 fp32 cached until the pass rereads it; 1 (a layer per group) where sysfs does not give
    the L3 size."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return 1
    units = {"K": 2 ** 10, "M": 2 ** 20}
    l3_bytes = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return max(1, l3_bytes // 4)


# The forward that also gives dS, for eager CPU training calls (differentiable_layer_losses).
# It reads S and T from memory once and rereads T (from L3 where a group's T fits), so it moves
# at most 4 passes to the separate forward and backward's 5, whatever the layer size:
# interleaved on the 2-core CI machine, 20% faster than the two ops at BERT-base B=32 fp32
# (24 MB of S and T per layer), 8-12% at Flan-T5-XXL B=8 (32 MB), a tie at BERT-base B=64
# bf16. A GPU keeps DESIGN §3's separate backward: nothing measured there says this pays.
_CPU_GRAD_FORWARD_OP = functools.partial(torch.ops.eofd_ext.forward_and_grad,
                                         group_bytes=grad_group_bytes())


def layer_losses_ext(batch: LayerBatch, power: float, eps: float) -> Tensor:
    """Per-layer losses ``(L,)`` from the compiled kernels (S and T in one common dtype)."""
    layers = promote_layers(batch.students + batch.teachers)
    num_layers = batch.num_layers
    grad_forward_op = _CPU_GRAD_FORWARD_OP if layers[0].device.type == "cpu" else None
    return differentiable_layer_losses(torch.ops.eofd_ext.forward, torch.ops.eofd_ext.backward,
                                       layers[:num_layers], layers[num_layers:], batch.masks,
                                       power, eps, grad_forward_op)
