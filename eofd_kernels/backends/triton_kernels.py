"""Fused Triton kernels of the EOFD loss: all distilled layers of a call in the same launches.

Layers are described by a small int64 table (one row of ``TABLE_FIELDS`` per layer: pointers,
sizes, strides), so layers of different ``(n, d)`` and strides go through one launch without
stacking copies. Grids are ``(token chunk, block of dims, layer)``; programs past a layer's
own sizes do no memory traffic.

Forward (docs/design.md, "The passes"), three launches:
  1. ``_stats_kernel``: each program reads its ``(chunk rows, BLOCK_D)`` slab of S and T once
     and writes, per dim, the valid-token count, a pivoted mean pair (pivot k = one valid T
     value, m = mean(T - k)), M2 and sum (S - T)^2: tile-exact two-pass statistics merged
     tile by tile with Chan's formula.
  2. ``_merge_chunks_kernel``: merges the chunk partials in chunk order (fp64; bitwise
     deterministic: the order never depends on scheduling) into per-dim sigma and E.
  3. ``_finalize_layers_kernel``: one program per layer: sbar, w, the loss, and the per-dim
     coefficients of the backward pass.
Backward, one launch: ``_backward_kernel`` writes dS (and dT when the teacher needs it).
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .. import layout
from .availability import interpreting
from .device_tables import TABLES

# Triton kernels may read only constexpr globals.
C = tl.constexpr

# Layer table columns (int64). After the L layer rows: power and eps as float64 bit patterns,
# so the finalize kernel sees them in full precision (a Python float argument becomes fp32).
S_PTR, T_PTR, MASK_PTR, N_ROWS, N_DIMS = C(0), C(1), C(2), C(3), C(4)
S_ROW, S_COL, T_ROW, T_COL, DS_PTR, DT_PTR = C(5), C(6), C(7), C(8), C(9), C(10)
TABLE_FIELDS = C(11)

# Chunk partials, (L, chunks, MOMENT_FIELDS, max_d) in the accumulation dtype (layout.M_*).
P_COUNT, P_PIVOT, P_PIVOT_OFFSET = C(layout.M_COUNT), C(layout.M_PIVOT), C(layout.M_PIVOT_OFFSET)
P_M2, P_SQUARED_ERROR = C(layout.M_M2), C(layout.M_SQUARED_ERROR)
PARTIAL_FIELDS = C(layout.MOMENT_FIELDS)

# Per-dim statistics (eofd_kernels.layout).
D_COUNT, D_PIVOT, D_PIVOT_OFFSET = C(layout.D_COUNT), C(layout.D_PIVOT), C(layout.D_PIVOT_OFFSET)
D_SIGMA, D_SQUARED_ERROR = C(layout.D_SIGMA), C(layout.D_SQUARED_ERROR)
D_WEIGHT, D_COEF_S, D_COEF_T = C(layout.D_WEIGHT), C(layout.D_COEF_S), C(layout.D_COEF_T)
DIM_FIELDS = C(layout.DIM_FIELDS)

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@triton.jit
def _chan_merge(n_a, k_a, m_a, q_a, n_b, k_b, m_b, q_b):
    """Merge two (count, pivot, mean offset, M2) summaries; the result keeps a's pivot.

    An empty a takes b whole, so a pivot is always an actual valid value of the data.
    """
    n = n_a + n_b
    frac = n_b / tl.maximum(n, 1.0)
    delta = (k_b - k_a) + (m_b - m_a)
    a_empty = n_a == 0
    k = tl.where(a_empty, k_b, k_a)
    m = tl.where(a_empty, m_b, m_a + delta * frac)
    q = tl.where(a_empty, q_b, q_a + q_b + delta * delta * n_a * frac)
    return n, k, m, q


@triton.jit
def _row_pointers(base, rows, cols, row_stride, col_stride, BLOCK_D: tl.constexpr,
                  ALIGNED: tl.constexpr):
    """Pointers of ``rows x cols``. ALIGNED (the host checked: 16-byte aligned base, row
    strides a multiple of 16 bytes, unit column stride, d a multiple of BLOCK_D) tells the
    compiler so, which is what makes its loads and stores 16-byte vectors: the base pointer
    comes from the int64 table, so it could not know either on its own."""
    if ALIGNED:
        ptrs = base + rows[:, None] * row_stride + cols[None, :]
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, BLOCK_D])
    else:
        ptrs = base + rows[:, None] * row_stride + cols[None, :] * col_stride
    return ptrs


@triton.jit
def _tile_bounds(rows, cols, n, d, ALIGNED: tl.constexpr):
    """Which rows, and which elements, of the tile lie inside the layer. ALIGNED: a block of
    dims is wholly in or out of the layer (a block past d acts as if the layer had no rows),
    so the bound is constant along a row: a mask that 16-byte vectors can use."""
    if ALIGNED:
        row_ok = rows < tl.where(tl.min(cols, axis=0) < d, n, 0)
        inside = tl.broadcast_to(row_ok[:, None], (rows.shape[0], cols.shape[0]))
    else:
        row_ok = rows < n
        inside = row_ok[:, None] & (cols < d)[None, :]
    return row_ok, inside


@triton.jit
def _load_tile(table_row, rows, cols, n, d, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr,
               ACC: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_D: tl.constexpr,
               ALIGNED: tl.constexpr):
    """S and T of ``rows x cols`` in ``ACC`` (0 outside), and which rows are valid tokens."""
    s_base = tl.load(table_row + S_PTR).to(tl.pointer_type(S_DTYPE))
    t_base = tl.load(table_row + T_PTR).to(tl.pointer_type(T_DTYPE))
    row_ok, inside = _tile_bounds(rows, cols, n, d, ALIGNED)
    s_ptrs = _row_pointers(s_base, rows, cols, tl.load(table_row + S_ROW),
                           tl.load(table_row + S_COL), BLOCK_D, ALIGNED)
    t_ptrs = _row_pointers(t_base, rows, cols, tl.load(table_row + T_ROW),
                           tl.load(table_row + T_COL), BLOCK_D, ALIGNED)
    s = tl.load(s_ptrs, mask=inside, other=0.0).to(ACC)
    t = tl.load(t_ptrs, mask=inside, other=0.0).to(ACC)
    valid = row_ok
    if HAS_MASK:
        mask_int = tl.load(table_row + MASK_PTR)
        mask_base = mask_int.to(tl.pointer_type(tl.int8))
        # A layer without a mask has a null mask pointer: every in-range row counts.
        has_mask = tl.full(rows.shape, 0, tl.int64) + mask_int != 0
        flags = tl.load(mask_base + rows, mask=row_ok & has_mask, other=1)
        valid = row_ok & (flags != 0)
    return s, t, valid


@triton.jit
def _program_tile(table, BLOCK_D: tl.constexpr):
    """A (chunk, dim block, layer) program's chunk and layer, its layer's table row, n and d,
    and its block's dims."""
    chunk = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(2).to(tl.int64)
    table_row = table + layer * TABLE_FIELDS
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    return chunk, layer, table_row, tl.load(table_row + N_ROWS), tl.load(table_row + N_DIMS), cols


@triton.jit
def _stats_kernel(
    table, partials, num_chunks, max_d,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, ACC: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TILES_PER_CHUNK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    chunk, layer, table_row, n, d, cols = _program_tile(table, BLOCK_D)
    tile_rows = tl.arange(0, BLOCK_N).to(tl.int64)

    count = tl.zeros((BLOCK_D,), ACC)
    pivot = tl.zeros((BLOCK_D,), ACC)
    mean = tl.zeros((BLOCK_D,), ACC)
    m2 = tl.zeros((BLOCK_D,), ACC)
    squared_error = tl.zeros((BLOCK_D,), ACC)
    for tile in range(TILES_PER_CHUNK):
        rows = (chunk * TILES_PER_CHUNK + tile) * BLOCK_N + tile_rows
        s, t, valid = _load_tile(table_row, rows, cols, n, d, S_DTYPE, T_DTYPE, ACC, HAS_MASK,
                                 BLOCK_D, ALIGNED)
        valid2 = valid[:, None]
        diff = s - t
        squared_error += tl.sum(tl.where(valid2, diff * diff, 0.0), axis=0)
        # Tile-exact two-pass stats around the tile's first valid row.
        tile_count = tl.sum(valid.to(ACC), axis=0)
        first = tl.min(tl.where(valid, tile_rows, BLOCK_N), axis=0)
        tile_pivot = tl.sum(tl.where((tile_rows == first)[:, None], t, 0.0), axis=0)
        shifted = tl.where(valid2, t - tile_pivot[None, :], 0.0)
        tile_mean = tl.sum(shifted, axis=0) / tl.maximum(tile_count, 1.0)
        dev = tl.where(valid2, shifted - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(dev * dev, axis=0)
        count, pivot, mean, m2 = _chan_merge(count, pivot, mean, m2,
                                             tile_count, tile_pivot, tile_mean, tile_m2)

    out = partials + (layer * num_chunks + chunk) * PARTIAL_FIELDS * max_d + cols
    keep = cols < max_d
    tl.store(out + P_COUNT * max_d, count, mask=keep)
    tl.store(out + P_PIVOT * max_d, pivot, mask=keep)
    tl.store(out + P_PIVOT_OFFSET * max_d, mean, mask=keep)
    tl.store(out + P_M2 * max_d, m2, mask=keep)
    tl.store(out + P_SQUARED_ERROR * max_d, squared_error, mask=keep)


@triton.jit
def _merge_chunks_kernel(table, partials, dim_stats, num_chunks, max_d, CHUNK_ROWS: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    dblock = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    table_row = table + layer * TABLE_FIELDS
    n = tl.load(table_row + N_ROWS)
    d = tl.load(table_row + N_DIMS)
    cols = dblock * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    keep = cols < max_d

    count = tl.zeros((BLOCK_D,), tl.float64)
    pivot = tl.zeros((BLOCK_D,), tl.float64)
    mean = tl.zeros((BLOCK_D,), tl.float64)
    m2 = tl.zeros((BLOCK_D,), tl.float64)
    squared_error = tl.zeros((BLOCK_D,), tl.float64)
    for chunk in range(0, tl.cdiv(n, CHUNK_ROWS)):
        part = partials + (layer * num_chunks + chunk) * PARTIAL_FIELDS * max_d + cols
        count, pivot, mean, m2 = _chan_merge(
            count, pivot, mean, m2,
            tl.load(part + P_COUNT * max_d, mask=keep, other=0.0).to(tl.float64),
            tl.load(part + P_PIVOT * max_d, mask=keep, other=0.0).to(tl.float64),
            tl.load(part + P_PIVOT_OFFSET * max_d, mask=keep, other=0.0).to(tl.float64),
            tl.load(part + P_M2 * max_d, mask=keep, other=0.0).to(tl.float64),
        )
        squared_error += tl.load(part + P_SQUARED_ERROR * max_d, mask=keep,
                                 other=0.0).to(tl.float64)

    # Dims past this layer's d are zero, so the padded rows of dim_stats are deterministic.
    in_layer = cols < d
    sigma = tl.sqrt(m2 / (count - 1.0))
    out = dim_stats + layer * DIM_FIELDS * max_d + cols
    tl.store(out + D_COUNT * max_d, tl.where(in_layer, count, 0.0), mask=keep)
    tl.store(out + D_PIVOT * max_d, tl.where(in_layer, pivot, 0.0), mask=keep)
    tl.store(out + D_PIVOT_OFFSET * max_d, tl.where(in_layer, mean, 0.0), mask=keep)
    tl.store(out + D_SIGMA * max_d, tl.where(in_layer, sigma, 0.0), mask=keep)
    tl.store(out + D_SQUARED_ERROR * max_d, tl.where(in_layer, squared_error, 0.0), mask=keep)


@triton.jit
def _power(ratio, power):
    """``ratio ** power`` in float64 with torch's ``x ** 0 == 1`` (also for 0 and NaN).

    float64 throughout: p = 1e-300 rounds to 0 in fp32, which would turn ``0 ** p = 0`` (a
    constant dim's weight) into 1."""
    return tl.where(power == 0.0, 1.0, tl.exp2(power * tl.log2(ratio)))


@triton.jit
def _finalize_layers_kernel(table, dim_stats, losses, max_d,
                            BLOCK_D: tl.constexpr):
    layer = tl.program_id(0).to(tl.int64)
    params = table + tl.num_programs(0) * TABLE_FIELDS
    power = tl.load(params).to(tl.float64, bitcast=True)
    eps = tl.load(params + 1).to(tl.float64, bitcast=True)
    d = tl.load(table + layer * TABLE_FIELDS + N_DIMS)
    stats = dim_stats + layer * DIM_FIELDS * max_d
    n_valid = tl.load(stats + D_COUNT * max_d)
    offs = tl.arange(0, BLOCK_D).to(tl.int64)

    sigma_sum = tl.zeros((BLOCK_D,), tl.float64)
    for start in range(0, d, BLOCK_D):
        sigma_sum += tl.load(stats + D_SIGMA * max_d + start + offs, mask=start + offs < d,
                             other=0.0)
    scale = tl.sum(sigma_sum, axis=0) / d + eps  # sbar + eps
    inv_nd = 1.0 / (n_valid * d)

    wsq_sum = tl.zeros((BLOCK_D,), tl.float64)
    for start in range(0, max_d, BLOCK_D):
        cols = start + offs
        in_layer = cols < d
        sigma = tl.load(stats + D_SIGMA * max_d + cols, mask=in_layer, other=1.0)
        squared_error = tl.load(stats + D_SQUARED_ERROR * max_d + cols, mask=in_layer, other=0.0)
        weight = tl.where(in_layer, _power(sigma / scale, power), 0.0)
        wsq_sum += weight * squared_error
        tl.store(stats + D_WEIGHT * max_d + cols, weight, mask=cols < max_d)
        tl.store(stats + D_COEF_S * max_d + cols, 2.0 * weight * inv_nd, mask=cols < max_d)
    weighted = tl.sum(wsq_sum, axis=0)
    tl.store(losses + layer, (weighted * inv_nd).to(losses.dtype.element_ty))

    # dT through the weights (docs/design.md, "Gradients"): coef_t = G_d / ((n' - 1) sigma_d).
    mean_term = weighted / (d * scale)
    for start in range(0, max_d, BLOCK_D):
        cols = start + offs
        in_layer = cols < d
        sigma = tl.load(stats + D_SIGMA * max_d + cols, mask=in_layer, other=1.0)
        squared_error = tl.load(stats + D_SQUARED_ERROR * max_d + cols, mask=in_layer, other=0.0)
        weight = tl.load(stats + D_WEIGHT * max_d + cols, mask=in_layer, other=0.0)
        g_d = power * inv_nd * (weight * squared_error / sigma - mean_term)
        # A constant dim (sigma = 0) gets 0, like eofd_coef_teacher in csrc/include/eofd_params.h.
        coef_t = tl.where(in_layer & (sigma != 0.0), g_d / ((n_valid - 1.0) * sigma), 0.0)
        tl.store(stats + D_COEF_T * max_d + cols, coef_t, mask=cols < max_d)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """``x.to(DTYPE)`` rounded to nearest even.

    Compiled Triton rounds fp32 -> bf16 to nearest even (fptrunc); the interpreter truncates
    (triton/runtime/interpreter.py casts with no rounding mode), which biases every bf16
    gradient towards zero. SOFT_BF16 (set only when interpreting) does the RTNE in integer
    arithmetic so the interpreter stores what the GPU stores.
    """
    if SOFT_BF16 and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _backward_kernel(
    table, dim_stats, grad_losses, max_d,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, ACC: tl.constexpr, HAS_MASK: tl.constexpr,
    NEED_DT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TILES_PER_CHUNK: tl.constexpr, SOFT_BF16: tl.constexpr, ALIGNED: tl.constexpr,
):
    chunk, layer, table_row, n, d, cols = _program_tile(table, BLOCK_D)
    col_ok = cols < d
    stats = dim_stats + layer * DIM_FIELDS * max_d + cols
    g = tl.load(grad_losses + layer).to(ACC)
    coef_s = (g * tl.load(stats + D_COEF_S * max_d, mask=col_ok, other=0.0)).to(ACC)[None, :]
    coef_t = (g * tl.load(stats + D_COEF_T * max_d, mask=col_ok, other=0.0)).to(ACC)[None, :]
    pivot = tl.load(stats + D_PIVOT * max_d, mask=col_ok, other=0.0).to(ACC)[None, :]
    mean = tl.load(stats + D_PIVOT_OFFSET * max_d, mask=col_ok, other=0.0).to(ACC)[None, :]
    ds_base = tl.load(table_row + DS_PTR).to(tl.pointer_type(S_DTYPE))
    dt_base = tl.load(table_row + DT_PTR).to(tl.pointer_type(T_DTYPE))
    tile_rows = tl.arange(0, BLOCK_N).to(tl.int64)
    for tile in range(TILES_PER_CHUNK):
        rows = (chunk * TILES_PER_CHUNK + tile) * BLOCK_N + tile_rows
        s, t, valid = _load_tile(table_row, rows, cols, n, d, S_DTYPE, T_DTYPE, ACC, HAS_MASK,
                                 BLOCK_D, ALIGNED)
        inside = _tile_bounds(rows, cols, n, d, ALIGNED)[1]
        ds = tl.where(valid[:, None], coef_s * (s - t), 0.0)
        # Gradients are written contiguous (n, d), from fresh (aligned) allocations.
        tl.store(_row_pointers(ds_base, rows, cols, d, 1, BLOCK_D, ALIGNED),
                 _round_to(ds, S_DTYPE, SOFT_BF16), mask=inside)
        if NEED_DT:
            dt = tl.where(valid[:, None], coef_t * ((t - pivot) - mean) - ds, 0.0)
            tl.store(_row_pointers(dt_base, rows, cols, d, 1, BLOCK_D, ALIGNED),
                     _round_to(dt, T_DTYPE, SOFT_BF16), mask=inside)


# ----------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a plan: ``kernel[grid](*args, **constexprs)``. Exposed so that a
    test can compile exactly what a GPU would run, ahead of time (triton_aot.py)."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs)


@dataclass(frozen=True)
class Target:
    """What the launch shape depends on: the interpreter, or a GPU with ``sms`` SMs."""

    sms: int
    interpreter: bool

    @staticmethod
    def of(device: torch.device) -> Target:
        if device.type == "cuda":
            return Target(torch.cuda.get_device_properties(device).multi_processor_count, False)
        return Target(1, interpreting())


# Programs the interpreter aims at: it runs them one after another, so the fewest, largest
# tiles are fastest. Tests raise it to exercise the chunk merge.
INTERPRETER_PROGRAMS = 1


def _launch_shape(max_n: int, max_d: int, num_layers: int, target: Target):
    """``(BLOCK_N, BLOCK_D, TILES_PER_CHUNK, num_chunks)`` from the shapes alone.

    It depends on nothing but shapes and the target, so a call's reduction order (hence its
    bits) is the same every time. On a GPU the grid aims at a few waves of programs.
    """
    if target.interpreter:
        block_n, block_d = 64, min(triton.next_power_of_2(max_d), 256)
        target_programs = INTERPRETER_PROGRAMS
    else:
        block_n, block_d = 32, min(triton.next_power_of_2(max_d), 128)
        target_programs = 8 * target.sms
    tiles = triton.cdiv(max_n, block_n)
    programs_per_chunk = num_layers * triton.cdiv(max_d, block_d)
    chunks_wanted = max(1, target_programs // programs_per_chunk)
    # Powers of two keep the number of compiled variants small; a chunk's fp32 partials hold
    # at most MAX_CHUNK_ROWS rows (csrc/include/chunk_policy.h says why).
    tiles_per_chunk = min(triton.next_power_of_2(triton.cdiv(tiles, chunks_wanted)),
                          max(1, layout.MAX_CHUNK_ROWS // block_n))
    return block_n, block_d, tiles_per_chunk, triton.cdiv(tiles, tiles_per_chunk)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _layer_table(students, teachers, masks, d_students=(), d_teachers=(), power=0.0, eps=0.0):
    """The ``(L * TABLE_FIELDS + 2,)`` int64 call table on the layers' device."""
    values = []
    for i, (s, t, m) in enumerate(zip(students, teachers, masks)):
        ds = d_students[i].data_ptr() if d_students else 0
        dt = d_teachers[i].data_ptr() if d_teachers else 0
        values += [s.data_ptr(), t.data_ptr(), 0 if m is None else m.data_ptr(),
                   s.shape[0], s.shape[1], s.stride(0), s.stride(1), t.stride(0), t.stride(1),
                   ds, dt]
    values += [_float_bits(power), _float_bits(eps)]
    device = students[0].device
    if device.type == "cuda":
        return TABLES.get(tuple(values), device)
    return torch.tensor(values, dtype=torch.int64)


def _aligned(layers, block_d: int) -> bool:
    """Whether every ``(n, d)`` layer allows 16-byte vector access (see _row_pointers)."""
    return all(x.stride(1) == 1 and x.data_ptr() % 16 == 0
               and (x.stride(0) * x.element_size()) % 16 == 0 and x.shape[1] % block_d == 0
               for x in layers)


def _rows(layers):
    return [layout.as_rows(x) for x in layers]


def _common(students, teachers, masks):
    s_dtype, t_dtype = students[0].dtype, teachers[0].dtype
    wide = torch.float64 in (s_dtype, t_dtype)
    return dict(
        S_DTYPE=_TL_DTYPES[s_dtype],
        T_DTYPE=_TL_DTYPES[t_dtype],
        ACC=tl.float64 if wide else tl.float32,
        HAS_MASK=any(m is not None for m in masks),
    )


def plan_forward(students, teachers, masks, power: float, eps: float, target: Target):
    """The forward's launches, and the ``(losses, dim_stats)`` they will write.

    students, teachers: ``[(n_l, d_l)]`` rows with one dtype each across layers;
    masks: ``[(n_l,)]`` bool contiguous or None.
    """
    device = students[0].device
    num_layers = len(students)
    max_n = max(s.shape[0] for s in students)
    max_d = max(s.shape[1] for s in students)
    block_n, block_d, tiles_per_chunk, num_chunks = _launch_shape(max_n, max_d, num_layers,
                                                                  target)
    opts = _common(students, teachers, masks)
    acc_dtype = torch.float64 if opts["ACC"] == tl.float64 else torch.float32
    table = _layer_table(students, teachers, masks, power=power, eps=eps)
    partials = torch.empty((num_layers, num_chunks, PARTIAL_FIELDS.value, max_d),
                           dtype=acc_dtype, device=device)
    dim_stats = torch.empty((num_layers, layout.DIM_FIELDS, max_d), dtype=torch.float64,
                            device=device)
    losses = torch.empty(num_layers, dtype=acc_dtype, device=device)
    dblocks = triton.cdiv(max_d, block_d)
    launches = [
        Launch(_stats_kernel, (num_chunks, dblocks, num_layers),
               (table, partials, num_chunks, max_d),
               dict(BLOCK_N=block_n, BLOCK_D=block_d, TILES_PER_CHUNK=tiles_per_chunk,
                    ALIGNED=_aligned(students + teachers, block_d), **opts)),
        Launch(_merge_chunks_kernel, (dblocks, num_layers),
               (table, partials, dim_stats, num_chunks, max_d),
               dict(CHUNK_ROWS=block_n * tiles_per_chunk, BLOCK_D=block_d)),
        Launch(_finalize_layers_kernel, (num_layers,), (table, dim_stats, losses, max_d),
               dict(BLOCK_D=min(triton.next_power_of_2(max_d), 1024))),
    ]
    return launches, (losses, dim_stats)


def plan_backward(grad_losses, students, teachers, masks, dim_stats, need_teacher_grad: bool,
                  target: Target):
    """The backward's launch, and the ``(dS, dT)`` it will write (dT ``[]`` unless needed).

    students, teachers: ``[(n_l, d_l)]`` rows. The gradients are contiguous ``(n_l, d_l)``
    (row stride d_l); the caller views them in the inputs' shapes.
    """
    d_students = [torch.empty(s.shape, dtype=s.dtype, device=s.device) for s in students]
    d_teachers = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in teachers
                  ] if need_teacher_grad else []
    num_layers = len(students)
    max_n = max(s.shape[0] for s in students)
    max_d = dim_stats.shape[-1]
    block_n, block_d, tiles_per_chunk, num_chunks = _launch_shape(max_n, max_d, num_layers,
                                                                  target)
    table = _layer_table(students, teachers, masks, d_students, d_teachers)
    launch = Launch(
        _backward_kernel, (num_chunks, triton.cdiv(max_d, block_d), num_layers),
        (table, dim_stats, grad_losses.contiguous(), max_d),
        dict(NEED_DT=need_teacher_grad, BLOCK_N=block_n, BLOCK_D=block_d,
             TILES_PER_CHUNK=tiles_per_chunk, SOFT_BF16=target.interpreter,
             ALIGNED=_aligned(students + teachers, block_d),
             **_common(students, teachers, masks)))
    return [launch], (d_students, d_teachers)


def _on_device(device: torch.device):
    """Launch under the tensors' device: Triton launches on the current device, which may be
    another GPU than the one holding the layers (cuda:1 tensors while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def eofd_forward(students, teachers, masks, power: float, eps: float):
    """Per-layer losses ``(L,)`` and the per-dim statistics ``(L, DIM_FIELDS, max_d)`` fp64.

    students, teachers: ``[(..., d_l)]`` (n_l tokens) with one dtype each across layers;
    masks: ``[(n_l,)]`` bool contiguous or None.
    """
    device = students[0].device
    # Held until the launches are enqueued: a copy made by as_rows is read through the table.
    student_rows, teacher_rows = _rows(students), _rows(teachers)
    with _on_device(device):
        launches, outputs = plan_forward(student_rows, teacher_rows, masks, power, eps,
                                         Target.of(device))
        for launch in launches:
            launch()
    return outputs


def eofd_backward(grad_losses, students, teachers, masks, dim_stats, need_teacher_grad: bool):
    """dS in the students' shapes and dtype, and dT likewise (``[]`` unless needed)."""
    device = students[0].device
    student_rows, teacher_rows = _rows(students), _rows(teachers)  # held, as in eofd_forward
    with _on_device(device):
        launches, (d_students, d_teachers) = plan_backward(
            grad_losses, student_rows, teacher_rows, masks, dim_stats, need_teacher_grad,
            Target.of(device))
        for launch in launches:
            launch()
    return ([g.view(s.shape) for g, s in zip(d_students, students)],
            [g.view(t.shape) for g, t in zip(d_teachers, teachers)])
