"""The public entry points: ``eofd_loss``, ``EOFDLoss`` and ``teacher_weights``.

The path to a kernel: the arguments are checked (:mod:`.inputs`), the registry gives the
backend object (:mod:`.backends`), and the one autograd path (:mod:`.layer_losses`) runs its
statistics pass and finalize forward and its backward backward; the layers are then reduced.
For ``triton`` and ``ext`` the statistics pass computes sigma_d in a kernel
(``backends/triton_kernels.py:_stats_kernel``, ``csrc/cpu/statistics_pass.h``,
``csrc/cuda/eofd_cuda.cu``): docs/design.md walks through it.
"""

from __future__ import annotations

import torch
from torch import nn

from . import layout
from .backends import check_backend, get_backend
from .inputs import (
    LayerBatch,
    check_power_eps,
    check_reduction,
    check_weights,
    prepare_layers,
    reduce_layers,
)
from .layer_losses import GradAhead, MergedStatistics, layer_losses
from .moments import finalize
from .split_batches import agree

__all__ = ["EOFDLoss", "eofd_loss", "teacher_weights"]


def _under_functorch(batch: LayerBatch) -> bool:
    """True inside ``torch.func`` transforms (vmap, grad, jacrev, ...), which only plain
    differentiable ops support."""
    if torch.compiler.is_compiling():  # dynamo cannot trace the check; it runs functorch itself
        return False
    return any(torch._C._functorch.is_functorch_wrapped_tensor(x)
               for x in batch.students + batch.teachers)


def _checked_call(student, teacher, mask, power, eps, backend, process_group, weights,
                  names=("student", "teacher")):
    """``(batch, power, eps, backend object, weights)`` of a call, checked. With a process
    group, every rank's argument errors and what the ranks must agree on are exchanged first
    (:func:`eofd_kernels.split_batches.agree`), so all raise the same error."""
    error, contract = None, None
    try:
        batch = prepare_layers(student, teacher, mask, names=names,
                               min_tokens=1 if process_group is not None else 2)
        power, eps = check_power_eps(power, eps)
        device = batch.teachers[0].device
        dims = [t.shape[-1] for t in batch.teachers]
        if weights is not None:
            weights = check_weights(weights, dims, device)
        backend = get_backend(backend, device)
    except (ValueError, TypeError, RuntimeError) as caught:
        if process_group is None:
            raise
        error = caught
    if process_group is not None:  # the contract is built only where ranks compare it
        if error is None:
            contract = {"power": power, "eps": eps, "layer widths": dims,
                        "student dtypes": [str(s.dtype) for s in batch.students],
                        "teacher dtypes": [str(t.dtype) for t in batch.teachers],
                        "weights given": weights is not None, "backend": backend.name}
        agree(process_group, error, contract)
    return batch, power, eps, backend, weights


def _layer_losses(student, teacher, mask, power, eps, backend, grad_ahead=None,
                  process_group=None, weights=None) -> torch.Tensor:
    batch, power, eps, picked, weights = _checked_call(student, teacher, mask, power, eps,
                                                       backend, process_group, weights)
    if _under_functorch(batch):
        if backend in ("triton", "ext") or weights is not None or process_group is not None:
            feature = (f"backend={backend!r}" if backend in ("triton", "ext")
                       else "weights= / process_group=")
            raise RuntimeError(f"{feature} does not support torch.func transforms (vmap, grad, "
                               "jacrev, ...); use backend='torch' (or 'auto') without it")
        plain = get_backend("torch" if backend == "auto" else backend, batch.teachers[0].device)
        return plain.differentiable_losses(batch, power, eps)
    return layer_losses(batch, picked, power, eps, grad_ahead=grad_ahead,
                        process_group=process_group, weights=weights)


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
            averaging gives the single-process gradient). A rank may hold one token, or only
            padding. One small collective for the arguments, one for the moments.
        weights: given ``w_d`` per layer (``(d,)`` tensors, finite and >= 0, e.g.
            ``teacher_weights`` of a whole optimizer batch) used instead of this call's: no
            gradient reaches the teacher through them; weights that require grad get theirs
            (learned per-dim weights). The loss divides by this call's valid tokens (at
            least one: a micro-batch of padding contributes 0).

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
    """:func:`eofd_loss` as a module: ``forward(student, teacher, mask, layer_weights,
    weights)``.

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


@torch.no_grad()
def teacher_weights(teacher, *, power: float = 0.5, mask=None, eps: float = 0.0,
                    backend: str = "auto", process_group=None):
    """The weights ``w_d`` (no grad): a ``(d,)`` tensor for one layer, else a list of them,
    from ``backend``'s statistics pass and the float64 finalize.

    With a ``process_group``, of the whole batch whose tokens the ranks hold between them.
    """
    batch, power, eps, backend, _ = _checked_call(teacher, teacher, mask, power, eps, backend,
                                                  process_group, None,
                                                  names=("teacher", "teacher"))
    moments = MergedStatistics(process_group).moments(backend, batch)
    dims = [t.shape[-1] for t in batch.teachers]
    _, stats = finalize(moments, dims, power, eps)
    weights = [stats[i, layout.D_WEIGHT, :d].to(batch.result_dtype) for i, d in enumerate(dims)]
    return weights[0] if isinstance(teacher, torch.Tensor) else weights
