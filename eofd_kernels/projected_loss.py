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
from .backends import op_pair, pick_backend
from .backends.teacher_stats import teacher_dim_stats
from .backends.torch_backend import masked_difference
from .inputs import check_power_eps, check_reduction, prepare_layers, reduce_layers
from .merged_stats import teacher_coefficient

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

    def add_chunk(self, rows: slice, x_c: Tensor, w: Tensor, d_s: Tensor) -> None:
        """The chunk's share: its dX rows and -dS rows of dT, and dW and db summed in place
        (outside autocast, BLAS with beta = 1: no temporary the size of W per chunk)."""
        first = rows.start == 0
        device_type = d_s.device.type
        autocast = torch.is_autocast_enabled(device_type)
        d_s_mm = d_s.to(torch.get_autocast_dtype(device_type) if autocast else w.dtype)
        if self.x is not None:
            self.x[rows] = d_s_mm @ w
        if self.w is not None:
            if autocast:  # bf16/fp16 products, summed into the fp32 gradient
                product = d_s_mm.t() @ x_c
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


class _ChunkOps:
    """The elementwise part of a chunk through the backend's kernels: the chunk's E_d, and
    dS for g = 1 from the layer's coefficients (``stats``: its ``(1, DIM_FIELDS, d)``)."""

    def __init__(self, backend: str, stats: Tensor):
        self.stats = stats
        self.forward, self.backward = op_pair(backend)  # no forward op: plain torch ops

    def __call__(self, s: Tensor, t: Tensor, valid: Tensor | None, acc: torch.dtype):
        """``(E_d (d,) float64, dS (rows, d))`` of one chunk (dS 0 on masked rows)."""
        if self.forward is None:
            diff = masked_difference(s, t, valid, acc)
            coef_s = self.stats[0, layout.D_COEF_S].to(acc)
            return diff.square().sum(dim=0).double(), diff * coef_s
        if not s.dtype == t.dtype == acc:  # the kernels read one dtype: the accumulation's
            s, t = s.to(acc), t.to(acc)
        squared_error = self.forward([s], [t], [valid], 0.0, 0.0)[1][0, layout.D_SQUARED_ERROR]
        d_s = self.backward(self.stats.new_ones(1), [s], [t], [valid], self.stats, False)[0][0]
        return squared_error, d_s


def _layer(x, w, b, t, valid, stats, power: float, eps: float, chunk_rows: int, needs,
           acc: torch.dtype, backend: str):
    """One layer's loss (0-dim, ``acc``) and its gradients for g = 1 (None when not needed).

    x ``(n, d_s)``, t ``(n, d_t)`` rows; valid ``(n,)`` bool or None; stats the layer's
    ``(DIM_FIELDS, max d)`` teacher statistics.
    """
    n, d = t.shape
    chunk_ops = _ChunkOps(backend, stats[None, :, :d].contiguous())
    grads = _LayerGrads(x, w, b, t, needs) if any(needs) else None
    squared_error = torch.zeros(d, dtype=torch.float64, device=t.device)
    for r0 in range(0, n, chunk_rows):
        rows = slice(r0, min(r0 + chunk_rows, n))
        x_c = x[rows]
        chunk_squared_error, d_s = chunk_ops(F.linear(x_c, w, b), t[rows],
                                      None if valid is None else valid[rows], acc)
        squared_error += chunk_squared_error
        if grads is not None:
            grads.add_chunk(rows, x_c, w, d_s)
    weight = stats[layout.D_WEIGHT, :d]
    n_valid = stats[layout.D_COUNT, 0]
    weighted = (weight * squared_error).sum()
    loss = (weighted / (n_valid * d)).to(acc)
    if grads is not None and grads.t is not None:
        _add_teacher_term(grads.t, t, valid, stats, squared_error, power, eps, chunk_rows)
    return loss, grads


def _add_teacher_term(d_t, t, valid, stats, squared_error, power, eps, chunk_rows):
    """dT += coef_t (T - mu) on valid rows, coef_t = G_d / ((n' - 1) sigma_d) (0 where
    sigma_d = 0: docs/design.md, "Degenerate dims")."""
    n, d = t.shape
    coef_t = teacher_coefficient(stats[layout.D_WEIGHT, :d], squared_error,
                                 stats[layout.D_SIGMA, :d], stats[layout.D_COUNT, 0], power,
                                 eps).to(d_t.dtype)
    pivot = stats[layout.D_PIVOT, :d].to(d_t.dtype)
    mean = stats[layout.D_PIVOT_OFFSET, :d].to(d_t.dtype)
    for r0 in range(0, n, chunk_rows):
        rows = slice(r0, min(r0 + chunk_rows, n))
        term = coef_t * ((t[rows].to(d_t.dtype) - pivot) - mean)
        if valid is not None:
            term = torch.where(valid[rows, None], term, 0.0)
        d_t[rows] += term


class _ProjectedLayerLosses(torch.autograd.Function):
    """apply(config, L, *xs, *ws, *bs, *ts) -> (L,) losses; config = (masks, stats, power,
    eps, chunk_rows, acc, want_grads). Gradients are computed in the forward for g = 1 (when
    the call records a graph) and scaled by the incoming grads in the backward."""

    @staticmethod
    def forward(ctx, config, num_layers, *tensors):
        masks, stats, power, eps, chunk_rows, acc, want_grads, backend = config
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
        ctx.shapes = [(x.shape, t.shape) for x, t in zip(xs, ts)]
        return torch.stack(losses)

    @staticmethod
    def backward(ctx, grad_losses):
        if torch.is_grad_enabled():
            raise RuntimeError("eofd_projected_loss: double backward (create_graph=True) is not "
                               "supported; project first and call eofd_loss for that")
        if ctx.grads is None:
            raise RuntimeError("eofd_projected_loss: backward through the same graph twice is "
                               "not supported (its gradients were handed out already)")
        columns = [[], [], [], []]
        for i, (grads, (x_shape, t_shape)) in enumerate(zip(ctx.grads, ctx.shapes)):
            g = grad_losses[i]
            for k, (grad, shape) in enumerate(((grads.x, x_shape), (grads.w, None),
                                               (grads.b, None), (grads.t, t_shape))
                                              if grads is not None else [(None, None)] * 4):
                if grad is not None:
                    # Eager CPU: reading g costs nothing, and g = 1 (a loss backwarded as
                    # is) saves a pass over dX and dW; a GPU, or a traced graph, scales
                    # without asking (no sync, no data-dependent branch).
                    if (g.device.type != "cpu" or torch.compiler.is_compiling()
                            or g.item() != 1.0):
                        grad.mul_(g.to(grad.dtype))
                    grad = grad.view(shape) if shape is not None else grad
                columns[k].append(grad)
        ctx.grads = None
        return (None, None, *columns[0], *columns[1], *columns[2], *columns[3])


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
        chunk_rows: token rows projected at a time (default: about 2M elements of S).

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
    backend = pick_backend(backend, teachers.teachers[0].device)
    stats = teacher_dim_stats(teachers, power, eps, backend)
    wide = any(x.dtype == torch.float64 for x in xs + teachers.teachers)
    config = (teachers.masks, stats, power, eps, chunk_rows,
              torch.float64 if wide else torch.float32, torch.is_grad_enabled(), backend)
    losses = _ProjectedLayerLosses.apply(config, num_layers, *xs, *ws, *bs, *teachers.teachers)
    return reduce_layers(losses, layer_weights, reduction)
