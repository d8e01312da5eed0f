"""``eofd_projected_loss``: the student's projection ``S = X Wᵀ + b`` fused into the loss.

Autograd would keep every projected state S (and build dS) for the backward: for a
Flan-T5-XXL teacher (d = 4096) over 24 mapped layers that is gigabytes the student needs.
EOFD allows better: the weights w_d depend on the teacher alone, so once the teacher's
per-dim statistics are known (one read of T, ``backends/teacher_stats.py``), every chunk of
rows yields its share of the loss and, linear in the incoming grad g, its gradients at once:

    S_c  = X_c Wᵀ + b                       (a chunk of rows; thrown away after the chunk)
    dS_c = c_d (S_c - T_c)                  c_d = 2 w_d / (n' d), 0 on masked rows
    dX_c = dS_c W,   dW += dS_cᵀ X_c,   db += Σ_rows dS_c,   E_d += Σ_rows (S_c - T_c)²

The backward only scales the stored gradients by g. Same matmuls as projecting and then
calling ``eofd_loss`` (one forward, two backward), and peak extra memory of a chunk instead of
L × n × d_t. With a teacher that needs a gradient, dT = g (-dS + coef_t (T - mu)) takes one
more pass over T once E_d is complete (docs/design.md, "Gradients").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import layout
from .backends import Backend, get_backend
from .inputs import LayerBatch, check_power_eps, check_reduction, prepare_layers, reduce_layers
from .moments import dim_stats_to_moments, finalize

__all__ = ["eofd_projected_loss"]

# Rows per chunk by default: a chunk's projected states hold about this many elements (16 MB
# in fp32). Larger chunks mean fewer in-place dW updates (each reads and writes all of dW);
# the bound on memory is a chunk, whatever the layer count.
CHUNK_ELEMENTS = 1 << 22


def _per_layer(x, num_layers: int, name: str, optional: bool = False) -> list:
    """One tensor for every layer, a sequence of them, or (optional) None."""
    if x is None and optional:
        return [None] * num_layers
    if isinstance(x, Tensor):
        return [x] * num_layers
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)) and len(x) == num_layers:
        for i, item in enumerate(x):
            if not (isinstance(item, Tensor) or (optional and item is None)):
                raise TypeError(f"{name}[{i}]: expected a tensor, got {type(item).__name__}")
        return list(x)
    raise TypeError(f"{name}: expected a tensor or a sequence of {num_layers} tensors"
                    f"{' (or None)' if optional else ''}, got {type(x).__name__}")


def _check_layer(i: int, x: Tensor, w: Tensor, b: Tensor | None, t: Tensor) -> None:
    if w.dim() != 2 or w.shape[0] != t.shape[-1] or w.shape[1] != x.shape[-1]:
        raise ValueError(f"layer {i}: weight must be (teacher width {t.shape[-1]}, student "
                         f"width {x.shape[-1]}), got {tuple(w.shape)}")
    if b is not None and b.shape != (t.shape[-1],):
        raise ValueError(f"layer {i}: bias must be ({t.shape[-1]},), got {tuple(b.shape)}")
    if x.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"layer {i}: student_hidden {tuple(x.shape)} and teacher "
                         f"{tuple(t.shape)} must have the same leading (token) shape")
    if not x.is_floating_point():
        raise TypeError(f"layer {i}: student_hidden must be floating point, got {x.dtype}")
    dtypes = {x.dtype, w.dtype} | ({b.dtype} if b is not None else set())
    if len(dtypes) > 1 and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"layer {i}: student_hidden ({x.dtype}), weight ({w.dtype}) and bias "
                        f"({None if b is None else b.dtype}) must share one dtype outside "
                        "autocast, as the projection x @ weight.T + bias needs")
    devices = {x.device, w.device, t.device} | ({b.device} if b is not None else set())
    if len(devices) > 1:
        raise ValueError(f"layer {i}: student_hidden, weight, bias and teacher must be on one "
                         f"device, got {sorted(map(str, devices))}")


class _LayerGrads:
    """The gradients of one layer's loss for g = 1, filled chunk by chunk."""

    def __init__(self, x: Tensor, w: Tensor, b: Tensor | None, t: Tensor, needs: tuple):
        need_x, need_w, need_b, need_t = needs
        self.x = torch.empty_like(x) if need_x else None
        self.w = torch.empty_like(w) if need_w else None
        self.b = torch.empty_like(b) if need_b and b is not None else None
        self.t = torch.empty_like(t) if need_t else None

    def add_chunk(self, rows: slice, x_c: Tensor, valid_c: Tensor | None, w: Tensor,
                  d_s: Tensor) -> None:
        """The chunk's share: its dX rows and -dS rows of dT, and dW and db summed in place
        (outside autocast, BLAS with beta = 1: no temporary the size of W per chunk). dS is 0
        on masked rows, but X may hold NaN there (fully masked attention rows): those rows
        are selected out of dW's product, never multiplied by 0."""
        first = rows.start == 0
        device_type = d_s.device.type
        autocast = torch.is_autocast_enabled(device_type)
        d_s_mm = d_s.to(torch.get_autocast_dtype(device_type) if autocast else w.dtype)
        if self.x is not None:
            self.x[rows] = d_s_mm @ w
        if self.w is not None:
            if valid_c is not None:
                x_c = torch.where(valid_c[:, None], x_c, 0.0)
            if autocast:  # bf16/fp16 products, summed into the fp32 gradient
                product = d_s_mm.t() @ x_c.to(d_s_mm.dtype)
                self.w.copy_(product) if first else self.w.add_(product)
            elif first:
                torch.mm(d_s_mm.t(), x_c, out=self.w)
            else:
                self.w.addmm_(d_s_mm.t(), x_c)
        if self.b is not None:
            column_sums = (d_s.new_ones(d_s.shape[0]) @ d_s).to(self.b.dtype)
            self.b.copy_(column_sums) if first else self.b.add_(column_sums)
        if self.t is not None:
            self.t[rows] = -d_s


def _chunk(backend: Backend, stats: Tensor, s: Tensor, t: Tensor, valid: Tensor | None,
           power: float):
    """``(E_d (d,) float64, dS for g = 1 (rows, d))`` of one chunk through the backend's own
    passes (``stats``: the layer's ``(1, DIM_FIELDS, d)`` teacher statistics)."""
    chunk = LayerBatch([s], [t], [valid])
    squared_error = backend.forward(chunk, 0.0, 0.0)[1][0, layout.D_SQUARED_ERROR]
    d_s = backend.backward(stats.new_ones(1), chunk, stats, False, power)[0][0]
    return squared_error, d_s


def _layer(x, w, b, t, valid, stats, power: float, eps: float, chunk_rows: int, needs,
           acc: torch.dtype, backend: Backend):
    """One layer's loss (0-dim, ``acc``) and its gradients for g = 1 (None when not needed).

    x ``(n, d_s)``, t ``(n, d_t)`` rows; valid ``(n,)`` bool or None; stats the layer's
    ``(DIM_FIELDS, max d)`` teacher statistics.
    """
    n, d = t.shape
    layer_stats = stats[None, :, :d].contiguous()
    grads = _LayerGrads(x, w, b, t, needs) if any(needs) else None
    squared_error = torch.zeros(d, dtype=torch.float64, device=t.device)
    for r0 in range(0, n, chunk_rows):
        rows = slice(r0, min(r0 + chunk_rows, n))
        x_c, valid_c = x[rows], None if valid is None else valid[rows]
        # The student's chunk in the accumulation dtype: its dS feeds dX, dW and db, summed in
        # acc. The teacher's is read in its own dtype (every backend takes each side's).
        s_c, t_c = F.linear(x_c, w, b).to(acc), t[rows]
        chunk_squared_error, d_s = _chunk(backend, layer_stats, s_c, t_c, valid_c, power)
        squared_error += chunk_squared_error
        if grads is not None:
            grads.add_chunk(rows, x_c, valid_c, w, d_s)
    # The layer's moments with its squared errors, finalized once more: the loss, and the dT
    # coefficient that needs every E_d.
    moments = dim_stats_to_moments(layer_stats)
    moments[0, layout.M_SQUARED_ERROR] = squared_error
    losses, final = finalize(moments, [d], power, eps)
    if grads is not None and grads.t is not None:
        _add_teacher_term(grads.t, t, valid, final[0], chunk_rows)
    return losses[0].to(acc), grads


def _add_teacher_term(d_t, t, valid, stats, chunk_rows):
    """dT += coef_t (T - mu) on valid rows (coef_t: 0 where sigma_d = 0)."""
    n, _ = t.shape
    coef_t = stats[layout.D_COEF_T].to(d_t.dtype)
    pivot = stats[layout.D_PIVOT].to(d_t.dtype)
    offset = stats[layout.D_PIVOT_OFFSET].to(d_t.dtype)
    for r0 in range(0, n, chunk_rows):
        rows = slice(r0, min(r0 + chunk_rows, n))
        term = coef_t * ((t[rows].to(d_t.dtype) - pivot) - offset)
        if valid is not None:
            term = torch.where(valid[rows, None], term, 0.0)
        d_t[rows] += term


class _ProjectedLayerLosses(torch.autograd.Function):
    """apply(config, L, *xs, *ws, *bs, *ts) -> (L,) losses; config = (backend, masks, stats,
    power, eps, chunk_rows, acc, want_grads). Gradients are computed in the forward for g = 1
    (when the call records a graph) and scaled by the incoming grads in the backward. A
    backward that builds a graph, or a second backward of a retained graph, recomputes them
    with the backend's differentiable formula on the projected states (the package's one
    double-backward rule)."""

    @staticmethod
    def forward(ctx, config, num_layers, *tensors):
        backend, masks, stats, power, eps, chunk_rows, acc, want_grads = config
        xs, ws, bs, ts = (list(tensors[i * num_layers:(i + 1) * num_layers]) for i in range(4))
        needs = [want_grads and need for need in ctx.needs_input_grad[2:]]
        losses, ctx.grads = [], []
        for i in range(num_layers):
            layer_needs = tuple(needs[k * num_layers + i] for k in range(4))
            loss, grads = _layer(layout.as_rows(xs[i]), ws[i], bs[i], layout.as_rows(ts[i]),
                                 masks[i], stats[i], power, eps, chunk_rows, layer_needs, acc,
                                 backend)
            losses.append(loss)
            ctx.grads.append(grads)
        ctx.backend, ctx.masks, ctx.power, ctx.eps = backend, masks, power, eps
        ctx.num_layers, ctx.bias_layers = num_layers, [i for i, b in enumerate(bs)
                                                       if b is not None]
        ctx.save_for_backward(*xs, *ws, *(bs[i] for i in ctx.bias_layers), *ts)
        return torch.stack(losses)

    @staticmethod
    def backward(ctx, grad_losses):
        num_layers = ctx.num_layers
        saved = ctx.saved_tensors  # first: X, W, b or T changed in place is an error
        xs, ws = list(saved[:num_layers]), list(saved[num_layers:2 * num_layers])
        bs: list[Tensor | None] = [None] * num_layers
        for i, b in zip(ctx.bias_layers, saved[2 * num_layers:-num_layers]):
            bs[i] = b
        ts = list(saved[-num_layers:])
        stored, ctx.grads = ctx.grads, None
        if torch.is_grad_enabled() or stored is None:
            return (None, None, *_recomputed_grads(ctx, xs, ws, bs, ts, grad_losses))
        columns = [[], [], [], []]
        for i, grads in enumerate(stored):
            g = grad_losses[i]
            for k, (grad, shape) in enumerate(((grads.x, xs[i].shape), (grads.w, None),
                                               (grads.b, None), (grads.t, ts[i].shape))
                                              if grads is not None else [(None, None)] * 4):
                if grad is not None:
                    grad.mul_(g.to(grad.dtype))  # no host read of g: no sync, no branch
                    grad = grad.view(shape) if shape is not None else grad
                columns[k].append(grad)
        return (None, None, *columns[0], *columns[1], *columns[2], *columns[3])


def _recomputed_grads(ctx, xs, ws, bs, ts, grad_losses) -> list[Tensor | None]:
    """The gradients of every input by autograd through the projection and the backend's
    differentiable formula; a graph of their own when the backward builds one."""
    num_layers = ctx.num_layers
    needs = ctx.needs_input_grad[2:]
    inputs = xs + ws + bs + ts
    with torch.enable_grad():
        leaves = [x if x is None or not need else
                  (x if torch.is_grad_enabled() and x.requires_grad else
                   x.detach().requires_grad_())
                  for x, need in zip(inputs, needs)]
        xs_, ws_, bs_, ts_ = (leaves[i * num_layers:(i + 1) * num_layers] for i in range(4))
        students = [F.linear(x, w, b) for x, w, b in zip(xs_, ws_, bs_)]
        batch = LayerBatch(students, ts_, ctx.masks)
        losses = ctx.backend.differentiable_losses(batch, ctx.power, ctx.eps)
        wanted = [x for x, need in zip(leaves, needs) if need and x is not None]
        grads = iter(torch.autograd.grad(losses, wanted, grad_losses.to(losses.dtype),
                                         create_graph=torch.is_grad_enabled(),
                                         allow_unused=True))
    return [next(grads) if need and x is not None else None for x, need in zip(leaves, needs)]


def eofd_projected_loss(student_hidden, weight, bias, teacher, *, power: float = 0.5,
                        mask=None, layer_weights=None, reduction: str = "sum", eps: float = 0.0,
                        backend: str = "auto", chunk_rows: int | None = None) -> Tensor:
    """EOFD loss of ``S = X Wᵀ + b`` against the teacher, never holding every S at once.

    Args:
        student_hidden: ``X`` ``(..., d_s)`` per layer (a tensor or a sequence).
        weight: ``W`` ``(d_t, d_s)``: one tensor for every layer, or one per layer.
        bias: ``b`` ``(d_t,)``: None, one tensor, or one per layer (None entries allowed).
        teacher: ``T`` ``(..., d_t)`` per layer, the leading shape of ``X``.
        power, mask, layer_weights, reduction, eps: as in :func:`eofd_kernels.eofd_loss`.
        backend: which backend computes the teacher's statistics.
        chunk_rows: token rows projected at a time (default: about 4M elements of S).

    Returns:
        The same loss as projecting each layer and calling ``eofd_loss`` (float32, float64
        for float64 inputs), differentiable in X, W, b and the teacher.
    """
    teachers = prepare_layers(teacher, teacher, mask, names=("teacher", "teacher"))
    num_layers = teachers.num_layers
    xs = _per_layer(student_hidden, num_layers, "student_hidden")
    ws = _per_layer(weight, num_layers, "weight")
    bs = _per_layer(bias, num_layers, "bias", optional=True)
    for i, (x, w, b, t) in enumerate(zip(xs, ws, bs, teachers.teachers)):
        _check_layer(i, x, w, b, t)
    power, eps = check_power_eps(power, eps)
    reduction = check_reduction(reduction)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // max(t.shape[-1] for t in teachers.teachers))
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows: expected an int >= 1, got {chunk_rows!r}")
    backend = get_backend(backend, teachers.teachers[0].device)
    with torch.no_grad():
        stats = backend.teacher_stats(teachers, power, eps)
    wide = any(x.dtype == torch.float64 for x in xs + teachers.teachers)
    config = (backend, teachers.masks, stats, power, eps, chunk_rows,
              torch.float64 if wide else torch.float32, torch.is_grad_enabled())
    losses = _ProjectedLayerLosses.apply(config, num_layers, *xs, *ws, *bs, *teachers.teachers)
    return reduce_layers(losses, layer_weights, reduction)
