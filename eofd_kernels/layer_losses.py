"""The one autograd path of the per-layer losses, for every backend and every entry point.

``layer_losses(batch, backend, power, eps, ...)`` returns the ``(L,)`` losses, differentiable
in the students, the teachers and given weights. Its forward takes the per-dim statistics
(``dim_stats``, ``layout.D_*``) from one of three sources:

* :class:`FusedStatistics`: the backend's forward (its statistics pass and finalize);
* :class:`ForecastStatistics`: the backend's ``forward_and_grad`` with the grads a
  :class:`GradAhead` forecasts: dS is written in the forward while the layers are in the cache
  (the extension on CPU), and handed out by the backward when the forecast was right;
* :class:`MergedStatistics`: the backend's moments, merged over a process group
  (:mod:`eofd_kernels.split_batches`) and finalized in float64
  (:func:`eofd_kernels.moments.finalize`), with given weights or the merged ones.

The backward is the backend's backward from ``dim_stats``, the incoming grads times the world
size for split batches (each rank gets ``world_size x`` the gradient of the whole batch's loss
with respect to its own S and T, the convention of ``torch.distributed.nn.functional
.all_gather``, so DDP's averaging yields the single-process gradient). Given weights that
require grad get ``g E_d / (n' d)``: learned per-dim weights train. One double-backward rule:
a backward that builds a graph (``create_graph=True``) recomputes the gradients with the
backend's differentiable formula; split batches refuse it (the formula has no collective).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import layout, split_batches
from .backends.base import Backend
from .inputs import LayerBatch
from .moments import finalize

__all__ = ["FusedStatistics", "ForecastStatistics", "GradAhead", "MergedStatistics",
           "layer_losses"]


class GradAhead:
    """A forecast of the per-layer grads the next backward of a loss will bring.

    Owned by the object a training loop calls every step (``EOFDLoss``, ``DistillationLoss``):
    a loop repeats its step, so the grads its last backward brought (1, a loss weight,
    1 / the accumulation steps) forecast the next. Only backends that offer
    ``forward_and_grad`` use it (the extension on CPU tensors, where comparing two small CPU
    vectors costs no device sync).
    """

    def __init__(self) -> None:
        self._grads: Tensor | None = None

    def forecast(self, num_layers: int) -> Tensor:
        """The last observed grads of ``num_layers`` layers, else ones (a loss backwarded as
        is), float64 on the CPU."""
        if self._grads is None or self._grads.shape != (num_layers,):
            return torch.ones(num_layers, dtype=torch.float64)
        return self._grads

    def observe(self, grads: Tensor) -> None:
        self._grads = grads.detach().to("cpu", torch.float64, copy=True)

    @staticmethod
    def matches(grads: Tensor, expected: Tensor) -> bool:
        return torch.equal(grads.to("cpu", torch.float64), expected)

    def __repr__(self) -> str:
        seen = None if self._grads is None else self._grads.tolist()
        return f"GradAhead(last grads={seen})"


@dataclass
class Statistics:
    """What a source gives the forward: the losses, ``dim_stats``, and for a forecast the
    early dS with the grads it was formed for."""

    losses: Tensor
    dim_stats: Tensor
    early_grads: list[Tensor] | None = None
    expected: Tensor | None = None


class FusedStatistics:
    world = 1
    grad_ahead = None

    def __call__(self, backend: Backend, batch: LayerBatch, power, eps, weights) -> Statistics:
        return Statistics(*backend.forward(batch, power, eps))


class ForecastStatistics:
    world = 1

    def __init__(self, grad_ahead: GradAhead):
        self.grad_ahead = grad_ahead

    def __call__(self, backend, batch, power, eps, weights) -> Statistics:
        expected = self.grad_ahead.forecast(batch.num_layers)
        losses, dim_stats, early = backend.forward_and_grad(batch, power, eps, expected)
        return Statistics(losses, dim_stats, early, expected)


class MergedStatistics:
    grad_ahead = None

    def __init__(self, process_group=None):
        self.process_group = process_group
        self.world = 1 if process_group is None else split_batches.world_size(process_group)

    def moments(self, backend: Backend, batch: LayerBatch) -> Tensor:
        """The backend's moments of this call, merged over the process group when given."""
        moments = backend.moments(batch)
        if self.process_group is not None:
            moments = split_batches.merged_moments(moments, self.process_group)
        return moments

    def __call__(self, backend, batch, power, eps, weights) -> Statistics:
        moments = self.moments(backend, batch)
        dims = [t.shape[-1] for t in batch.teachers]
        given = None if weights is None else [w.detach().to(torch.float64) for w in weights]
        losses, dim_stats = finalize(moments, dims, power, eps, given)
        return Statistics(losses.to(batch.result_dtype), dim_stats)


def _weight_grads(grad_losses: Tensor, dim_stats: Tensor, weights: list[Tensor],
                  needs: list[bool]) -> list[Tensor | None]:
    """d loss_l / d w_d = g_l E_d / (max(n', 1) d), per layer that needs it."""
    grads = []
    for i, (w, need) in enumerate(zip(weights, needs)):
        if not need:
            grads.append(None)
            continue
        d = w.shape[0]
        divisor = dim_stats[i, layout.D_COUNT, 0].clamp_min(1.0) * d
        grad = grad_losses[i].to(torch.float64) * dim_stats[i, layout.D_SQUARED_ERROR, :d]
        grads.append((grad / divisor).to(w.dtype))
    return grads


class _LayerLosses(torch.autograd.Function):
    """apply(backend, source, power, eps, L, has_weights, *students, *teachers, *masks,
    *weights) -> (L,) losses."""

    @staticmethod
    def forward(ctx, backend, source, power, eps, num_layers, has_weights, *tensors):
        students = list(tensors[:num_layers])
        teachers = list(tensors[num_layers:2 * num_layers])
        masks = list(tensors[2 * num_layers:3 * num_layers])
        weights = list(tensors[3 * num_layers:]) if has_weights else None
        batch = LayerBatch(students, teachers, masks)
        stats = source(backend, batch, power, eps, weights)
        ctx.backend, ctx.power, ctx.eps = backend, power, eps
        ctx.world, ctx.grad_ahead = source.world, source.grad_ahead
        ctx.early_grads, ctx.expected = stats.early_grads, stats.expected
        ctx.num_layers, ctx.has_weights = num_layers, has_weights
        ctx.need_teacher_grad = any(ctx.needs_input_grad[6 + num_layers:6 + 2 * num_layers])
        ctx.mask_layers = [i for i, m in enumerate(masks) if m is not None]
        # S and T are saved tensors, so changing them in place before the backward is a
        # version-counter error, whichever way the backward goes.
        ctx.save_for_backward(*students, *teachers, *(masks[i] for i in ctx.mask_layers),
                              *(weights or []), stats.dim_stats)
        return stats.losses

    @staticmethod
    def backward(ctx, grad_losses):
        num_layers = ctx.num_layers
        saved = ctx.saved_tensors
        students, teachers = list(saved[:num_layers]), list(saved[num_layers:2 * num_layers])
        masks: list[Tensor | None] = [None] * num_layers
        num_masks = len(ctx.mask_layers)
        for i, m in zip(ctx.mask_layers, saved[2 * num_layers:2 * num_layers + num_masks]):
            masks[i] = m
        weights = list(saved[2 * num_layers + num_masks:-1]) if ctx.has_weights else None
        dim_stats = saved[-1]
        batch = LayerBatch(students, teachers, masks)
        needs_weight = (list(ctx.needs_input_grad[6 + 3 * num_layers:]) if ctx.has_weights
                        else [])
        early, ctx.early_grads = ctx.early_grads, None  # a retained graph's 2nd backward recomputes
        if torch.is_grad_enabled():
            d_students, d_teachers, d_weights = _differentiable_grads(ctx, batch, weights,
                                                                      needs_weight, grad_losses)
        else:
            if early is not None and GradAhead.matches(grad_losses, ctx.expected):
                d_students, d_teachers = early, []
            else:
                if ctx.grad_ahead is not None:
                    ctx.grad_ahead.observe(grad_losses)
                scaled = grad_losses if ctx.world == 1 else grad_losses * ctx.world
                d_students, d_teachers = ctx.backend.backward(
                    scaled, batch, dim_stats, ctx.need_teacher_grad, ctx.power)
            d_weights = (_weight_grads(grad_losses, dim_stats, weights, needs_weight)
                         if ctx.has_weights else [])
        if not ctx.need_teacher_grad:
            d_teachers = [None] * num_layers
        return (None,) * 6 + (*d_students, *d_teachers, *([None] * num_layers), *d_weights)


def _differentiable_grads(ctx, batch: LayerBatch, weights, needs_weight, grad_losses):
    """dS, dT (None when frozen) and the weights' grads as differentiable functions of the
    inputs and the incoming grads: the backend's formula, differentiated by autograd."""
    if ctx.world != 1:
        raise RuntimeError("eofd_loss with process_group: double backward (create_graph=True)"
                           " is not supported")
    losses = ctx.backend.differentiable_losses(batch, ctx.power, ctx.eps, weights)
    num_layers = batch.num_layers
    inputs = batch.students + (batch.teachers if ctx.need_teacher_grad else [])
    wanted = [w for w, need in zip(weights or [], needs_weight) if need]
    grads = torch.autograd.grad(losses, inputs + wanted, grad_losses.to(losses.dtype),
                                create_graph=True)
    d_students = list(grads[:num_layers])
    d_teachers = list(grads[num_layers:len(inputs)]) if ctx.need_teacher_grad else []
    rest = iter(grads[len(inputs):])
    d_weights = [next(rest) if need else None for need in needs_weight]
    return d_students, d_teachers, d_weights


def layer_losses(batch: LayerBatch, backend: Backend, power: float, eps: float, *,
                 grad_ahead: GradAhead | None = None, process_group=None,
                 weights: list[Tensor] | None = None) -> Tensor:
    """Per-layer losses ``(L,)`` of ``batch`` through ``backend`` (see the module's doc).

    ``weights``: checked ``(d,)`` tensors per layer or None; ``grad_ahead``: the caller's
    forecast (used where the backend offers ``forward_and_grad`` and the call trains S with
    a frozen teacher).
    """
    if process_group is not None or weights is not None:
        source = MergedStatistics(process_group)
    elif (grad_ahead is not None and torch.is_grad_enabled()
          and any(s.requires_grad for s in batch.students)
          and backend.offers_forward_and_grad(batch)):
        source = ForecastStatistics(grad_ahead)
    else:
        source = FusedStatistics()
    return _LayerLosses.apply(backend, source, power, eps, batch.num_layers,
                              weights is not None, *batch.students, *batch.teachers,
                              *batch.masks, *(weights or []))
