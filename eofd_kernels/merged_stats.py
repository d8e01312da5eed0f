"""The loss from per-dim summaries: merged across ranks (``process_group=``) or finalized with
given weights (``weights=``).

EOFD's weights are statistics of the whole batch. When a batch is split over ranks, each rank
computes its per-dim summaries with its backend's statistics pass (count, pivoted mean, M2
and the sum of (S - T)^2: a few KB per layer), one collective gathers them, and every rank
merges them in rank order (Chan's formula on pivoted means, float64) and finalizes the same
sigma_d, w_d and loss. The backward runs the backend's own backward op from the merged
coefficients, with the incoming grads times the world size: each rank gets ``world_size x``
the gradient of the whole batch's loss with respect to its own S and T (the convention of
``torch.distributed.nn.functional.all_gather``), so DDP's averaging yields the single-process
gradient. With ``weights=`` (precomputed w_d, e.g. from ``teacher_weights`` over a whole
optimizer batch), the finalize takes them as given: no gradient reaches the teacher through
them (docs/design.md, "Split batches").
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import layout
from .backends import op_pair, pick_backend
from .backends.op_autograd import promote_layers, save_layers, saved_layers
from .backends.torch_backend import masked_difference, teacher_dim_stats_torch
from .inputs import LayerBatch

__all__ = ["SUMMARY_FIELDS", "group_layer_losses", "group_teacher_weights",
           "local_summaries", "merge_summaries", "merged_dim_stats", "teacher_coefficient"]

# Per-dim summary fields, (L, SUMMARY_FIELDS, max d) float64.
S_COUNT, S_PIVOT, S_PIVOT_OFFSET, S_M2, S_SQUARED_ERROR = range(5)
SUMMARY_FIELDS = 5


def local_summaries(batch: LayerBatch, forward_op) -> Tensor:
    """This rank's ``(L, SUMMARY_FIELDS, max d)`` float64 summaries (dims past d are 0)."""
    if forward_op is None:
        stats = teacher_dim_stats_torch(batch, 0.0, 0.0)
        squared_error = stats.new_zeros(stats.shape[0], stats.shape[2])
        for i, (s, t, m) in enumerate(zip(batch.students, batch.teachers, batch.masks)):
            diff = masked_difference(layout.as_rows(s), layout.as_rows(t), m, torch.float64)
            squared_error[i, :diff.shape[1]] = diff.square().sum(dim=0)
        stats[:, layout.D_SQUARED_ERROR] = squared_error
    else:
        students, teachers = promote_layers(batch.students), promote_layers(batch.teachers)
        stats = forward_op(students, teachers, batch.masks, 0.0, 0.0)[1]
    count = stats[:, layout.D_COUNT]
    m2 = torch.where(count > 1, stats[:, layout.D_SIGMA].square() * (count - 1), 0.0)
    return torch.stack([count, stats[:, layout.D_PIVOT], stats[:, layout.D_PIVOT_OFFSET], m2,
                        stats[:, layout.D_SQUARED_ERROR]], dim=1)


def merge_summaries(parts: list[Tensor]) -> Tensor:
    """Merge ``(..., SUMMARY_FIELDS, d)`` summaries in list order (the pivot of the first
    non-empty part is kept; an empty part changes nothing)."""
    merged = parts[0].clone()
    for part in parts[1:]:
        n_a, k_a, m_a, q_a, e_a = merged.unbind(-2)
        n_b, k_b, m_b, q_b, e_b = part.unbind(-2)
        n = n_a + n_b
        frac = n_b / n.clamp_min(1.0)
        delta = (k_b - k_a) + (m_b - m_a)
        a_empty = n_a == 0
        merged = torch.stack([
            n,
            torch.where(a_empty, k_b, k_a),
            torch.where(a_empty, m_b, m_a + delta * frac),
            torch.where(a_empty, q_b, q_a + q_b + delta * delta * n_a * frac),
            e_a + e_b,
        ], dim=-2)
    return merged


def teacher_coefficient(weight: Tensor, squared_error: Tensor, sigma: Tensor, n_valid: Tensor,
                        power: float, eps: float) -> Tensor:
    """The dT coefficient through the weights per dim, G_d / ((n' - 1) sigma_d) (the fused
    finalize's ``eofd_coef_teacher``), 0 for a constant dim (docs/design.md, "Degenerate
    dims"); all ``(d,)`` float64 but ``n_valid`` (0-dim)."""
    d = sigma.shape[0]
    scale = sigma.mean() + eps
    weighted = (weight * squared_error).sum()
    g_d = power / (n_valid * d) * (weight * squared_error / sigma - weighted / (d * scale))
    return torch.where(sigma == 0, 0.0, g_d / ((n_valid - 1) * sigma))


def merged_dim_stats(summaries: Tensor, dims: list[int], power: float, eps: float,
                     weights: list[Tensor] | None) -> tuple[Tensor, Tensor]:
    """``(losses (L,) float64, dim_stats (L, DIM_FIELDS, max d))`` in the ops' layout from
    merged summaries: sigma, w (or the given weights), the loss and both coefficients."""
    num_layers, _, max_d = summaries.shape
    stats = summaries.new_zeros(num_layers, layout.DIM_FIELDS, max_d)
    losses = []
    for i, d in enumerate(dims):
        count, pivot, mean, m2, squared_error = summaries[i, :, :d].unbind(0)
        n_valid = count[0]
        sigma = (m2 / (n_valid - 1)).sqrt()
        inv_nd = 1.0 / (n_valid * d)
        if weights is None:
            weight = (sigma / (sigma.mean() + eps)) ** power
            coef_t = teacher_coefficient(weight, squared_error, sigma, n_valid, power, eps)
        else:
            weight = weights[i]
            coef_t = torch.zeros_like(weight)  # given weights carry no teacher gradient
        weighted = (weight * squared_error).sum()
        for field, value in ((layout.D_COUNT, count), (layout.D_PIVOT, pivot),
                             (layout.D_PIVOT_OFFSET, mean), (layout.D_SIGMA, sigma),
                             (layout.D_SQUARED_ERROR, squared_error), (layout.D_WEIGHT, weight),
                             (layout.D_COEF_S, 2 * weight * inv_nd), (layout.D_COEF_T, coef_t)):
            stats[i, field, :d] = value
        losses.append(weighted * inv_nd)
    return torch.stack(losses), stats


def _gather(summaries: Tensor, dims: list[int], group) -> tuple[list[Tensor], int]:
    """Every rank's summaries, in rank order, after checking that all ranks pass the same
    layers (one small collective first, so a mismatch is an error, not a hang)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    shapes: list = [None] * world
    dist.all_gather_object(shapes, dims, group=group)
    if any(s != dims for s in shapes):
        raise ValueError(f"student: every rank must pass the same layers (count and widths); "
                         f"ranks passed {shapes}")
    parts = [torch.empty_like(summaries) for _ in range(world)]
    dist.all_gather(parts, summaries.contiguous(), group=group)
    return parts, world


class _MergedLayerLosses(torch.autograd.Function):
    """apply(config, *students, *teachers, *masks) -> (L,) losses; config = (backward op,
    power, eps, losses, dim_stats, world size). The forward has run already (the
    summaries, the collective, the finalize): this wires the backward op into autograd."""

    @staticmethod
    def forward(ctx, config, *layers):
        backward_op, power, eps, losses, dim_stats, world, num_layers = config
        students = list(layers[:num_layers])
        teachers = list(layers[num_layers:2 * num_layers])
        masks = list(layers[2 * num_layers:])
        ctx.backward_op, ctx.world = backward_op, world
        save_layers(ctx, students, teachers, masks, dim_stats, power, eps,
                    any(ctx.needs_input_grad[1 + num_layers:1 + 2 * num_layers]))
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        if torch.is_grad_enabled():
            raise RuntimeError("eofd_loss with process_group or weights: double backward "
                               "(create_graph=True) is not supported")
        students, teachers, masks, dim_stats = saved_layers(ctx)
        grads = (grad_losses * ctx.world).to(torch.float64)
        d_students, d_teachers = ctx.backward_op(grads, students, teachers, masks, dim_stats,
                                                 ctx.need_teacher_grad)
        if not ctx.need_teacher_grad:
            d_teachers = [None] * ctx.num_layers
        return (None, *d_students, *d_teachers) + (None,) * ctx.num_layers


def _check_weights(weights, dims: list[int], device) -> list[Tensor]:
    if isinstance(weights, Tensor):
        weights = [weights]
    if not isinstance(weights, (list, tuple)) or len(weights) != len(dims):
        raise ValueError(f"weights: expected one (d,) tensor per layer ({len(dims)} layers), "
                         f"got {type(weights).__name__} of length "
                         f"{len(weights) if hasattr(weights, '__len__') else '?'}")
    checked = []
    for i, (w, d) in enumerate(zip(weights, dims)):
        if not isinstance(w, Tensor) or w.shape != (d,):
            shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"weights[{i}]: expected shape ({d},) for layer {i}, got {shape}")
        checked.append(w.detach().to(device=device, dtype=torch.float64))
    return checked


def _batch_summaries(batch: LayerBatch, forward_op, process_group):
    """This call's summaries, merged over ``process_group`` when given; and the world size."""
    dims = [t.shape[-1] for t in batch.teachers]
    summaries = local_summaries(batch, forward_op)
    if process_group is None:
        return summaries, 1
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    parts, world = _gather(summaries, dims, process_group)
    return merge_summaries(parts), world


@torch.no_grad()
def group_teacher_weights(batch: LayerBatch, power: float, eps: float,
                          process_group) -> list[Tensor]:
    """The weights ``w_d`` of the whole batch split over ``process_group``, per layer."""
    summaries, _ = _batch_summaries(batch, None, process_group)
    dims = [t.shape[-1] for t in batch.teachers]
    _, stats = merged_dim_stats(summaries, dims, power, eps, None)
    return [stats[i, layout.D_WEIGHT, :d].to(batch.result_dtype) for i, d in enumerate(dims)]


def group_layer_losses(batch: LayerBatch, power: float, eps: float, backend: str,
                       process_group=None, weights=None) -> Tensor:
    """Per-layer losses ``(L,)`` of the whole batch split over ``process_group`` (or of this
    call's tokens when None), with the given ``weights`` or the merged statistics' own."""
    device = batch.teachers[0].device
    dims = [t.shape[-1] for t in batch.teachers]
    if weights is not None:
        weights = _check_weights(weights, dims, device)
    forward_op, backward_op = op_pair(pick_backend(backend, device))
    summaries, world = _batch_summaries(batch, forward_op, process_group)
    losses, dim_stats = merged_dim_stats(summaries, dims, power, eps, weights)
    losses = losses.to(batch.result_dtype)
    students = promote_layers(batch.students) if forward_op is not None else batch.students
    teachers = promote_layers(batch.teachers) if forward_op is not None else batch.teachers
    config = (backward_op, power, eps, losses, dim_stats, world, batch.num_layers)
    return _MergedLayerLosses.apply(config, *students, *teachers, *batch.masks)
