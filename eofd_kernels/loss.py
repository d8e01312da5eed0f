"""The public entry points: ``eofd_loss``, ``EOFDLoss`` and ``teacher_weights``.

The path to a kernel: :func:`eofd_loss` checks the arguments (:mod:`.inputs`), picks a
backend (:mod:`.backends`) and reduces its per-layer losses over the layers. A backend's
module (``backends/<name>_backend.py``) calls its ops; for ``triton`` and ``ext`` the op's
forward computes sigma_d in its statistics pass (``backends/triton_kernels.py:_stats_kernel``,
``csrc/cpu/statistics_pass.h``, ``csrc/cuda/eofd_cuda.cu``): docs/design.md walks through it.
"""

from __future__ import annotations

import torch
from torch import nn

from .backends import check_backend, resolve_backend
from .backends.grad_ahead import GradAhead
from .backends.torch_backend import layer_weights_torch
from .inputs import check_power_eps, check_reduction, prepare_layers, reduce_layers
from .merged_stats import group_layer_losses, group_teacher_weights

__all__ = ["EOFDLoss", "eofd_loss", "teacher_weights"]


def _under_functorch(batch) -> bool:
    """True inside ``torch.func`` transforms (vmap, grad, jacrev, ...), which only the torch
    backend's plain ops support."""
    if torch.compiler.is_compiling():  # dynamo cannot trace the check; it runs functorch itself
        return False
    return any(torch._C._functorch.is_functorch_wrapped_tensor(x)
               for x in batch.students + batch.teachers)


def _layer_losses(student, teacher, mask, power, eps, backend, grad_ahead,
                  process_group=None, weights=None) -> torch.Tensor:
    batch = prepare_layers(student, teacher, mask)
    power, eps = check_power_eps(power, eps)
    device = batch.teachers[0].device
    if _under_functorch(batch):
        name = check_backend(backend)
        if name in ("triton", "ext") or process_group is not None or weights is not None:
            feature = (f"backend={name!r}" if name in ("triton", "ext")
                       else "process_group / weights")
            raise RuntimeError(f"{feature} does not support torch.func transforms (vmap, grad, "
                               "jacrev, ...); use backend='torch' (or 'auto') without them")
        return resolve_backend("torch" if name == "auto" else name, device)(batch, power, eps)
    if process_group is not None or weights is not None:
        return group_layer_losses(batch, power, eps, check_backend(backend), process_group,
                                  weights)
    return resolve_backend(backend, device)(batch, power, eps, grad_ahead)


def eofd_loss(student, teacher, *, power: float = 0.5, mask=None, layer_weights=None,
              reduction: str = "sum", eps: float = 0.0, backend: str = "auto",
              process_group=None, weights=None) -> torch.Tensor:
    """EOFD loss over one or several distilled layers (docs/design.md, "The math").

    Args:
        student: ``(..., d)`` tensor, or a sequence of them (one per layer; layers may differ in
            token count and d). Already projected to the teacher's width.
        teacher: the same shapes as ``student``; its gradient flows through the weights too.
        power: p in ``w_d = (sigma_d / (sbar + eps)) ** p``; 0 gives plain MSE.
        mask: None, one tensor of a layer's leading shape (bool or 0/1; applied to every layer
            of that leading shape), or a sequence with one mask (or None) per layer.
        layer_weights: lambda_l per layer (a sequence of numbers or 0-dim tensors, e.g. a
            ParameterList, or an ``(L,)`` tensor; gradients reach them), or None for all ones.
        reduction: ``"sum"`` or ``"mean"`` over layers (0-dim result), or ``"none"`` (``(L,)``).
        eps: added to sbar; 0 is exactly the paper.
        backend: ``"auto"``, ``"triton"``, ``"ext"``, ``"torch"`` or ``"reference"``.
        process_group: a ``torch.distributed`` group whose ranks each pass their own tokens of
            one batch: the loss is the whole batch's, the same on every rank, and the backward
            gives each rank ``world_size x`` the gradient with respect to its S and T (so DDP's
            averaging gives the single-process gradient). One small collective per call.
        weights: precomputed ``w_d`` per layer (``(d,)`` tensors, e.g. ``teacher_weights`` of
            a whole optimizer batch) used instead of this call's: no gradient reaches the
            teacher through them. The loss still divides by this call's valid tokens.

    Returns:
        float32 (float64 when an input is float64) loss. Stateless: a training loop that
        calls it every step runs faster on CPU through :class:`EOFDLoss` (its own forecast of
        the incoming grads lets the forward write dS).
    """
    reduction = check_reduction(reduction)
    losses = _layer_losses(student, teacher, mask, power, eps, backend, None, process_group,
                           weights)
    return reduce_layers(losses, layer_weights, reduction)


class EOFDLoss(nn.Module):
    """:func:`eofd_loss` as a module: ``forward(student, teacher, mask, layer_weights)``.

    Arguments are checked here, at construction. The module owns a :class:`GradAhead`
    (``grad_ahead``): the incoming grads its last backward brought, which an eager CPU
    training step with the extension uses to write dS in the forward (same bits as the plain
    backward; docs/design.md, "The CPU training step"). Use one module per loss in a loop.
    """

    def __init__(self, power: float = 0.5, reduction: str = "sum", eps: float = 0.0,
                 backend: str = "auto", process_group=None):
        super().__init__()
        self.power, self.eps = check_power_eps(power, eps)
        self.reduction = check_reduction(reduction)
        self.backend = check_backend(backend)
        self.process_group = process_group
        self.grad_ahead = GradAhead()

    def forward(self, student, teacher, mask=None, layer_weights=None,
                weights=None) -> torch.Tensor:
        losses = _layer_losses(student, teacher, mask, self.power, self.eps, self.backend,
                               self.grad_ahead, self.process_group, weights)
        return reduce_layers(losses, layer_weights, self.reduction)

    def extra_repr(self) -> str:
        return (f"power={self.power}, reduction={self.reduction!r}, eps={self.eps}, "
                f"backend={self.backend!r}")


def teacher_weights(teacher, *, power: float = 0.5, mask=None, eps: float = 0.0,
                    process_group=None):
    """The weights ``w_d`` (no grad): a ``(d,)`` tensor for one layer, else a list of them.

    With a ``process_group``, of the whole batch whose tokens the ranks hold between them.
    """
    power, eps = check_power_eps(power, eps)
    batch = prepare_layers(teacher, teacher, mask, names=("teacher", "teacher"))
    if process_group is None:
        weights = layer_weights_torch(batch, power, eps)
    else:
        weights = group_teacher_weights(batch, power, eps, process_group)
    return weights[0] if isinstance(teacher, torch.Tensor) else weights

