"""Fused Triton kernels of the EOFD loss: all distilled layers of a call in the same launches.

Layers are described by a small int64 table in device memory (one row of ``LAYER_FIELDS`` per
layer: pointers, sizes, strides), so layers of different ``(n, d)`` and strides go through one
launch without stacking copies; the backward's output pointers are a second table
(``GRAD_FIELDS`` per layer), so the layer table of a forward serves its backward too
(device_tables.py). Grids are ``(token chunk, block of dims, layer)``; programs past a layer's
own sizes do no memory traffic. Every program loads its table row once, before its loop.

Forward (docs/design.md, "The passes"), three launches:
  1. ``_stats_kernel``: each program walks its chunk of rows tile by tile, reading S and T
     once, and keeps per element of the tile running moments around a pivot shared by its
     column (Welford's update: count, mean offset, M2, and sum (S - T)^2); one reduction over
     the tile's rows at the end of the chunk merges them. Its loop has no cross-thread
     traffic. Rows of padding are never loaded.
  2. ``_merge_chunks_kernel``: merges the chunk partials in chunk order (fp64; bitwise
     deterministic: the order never depends on scheduling) into per-dim sigma and E.
  3. ``_finalize_layers_kernel``: one program per layer: sbar, w, the loss, and the per-dim
     coefficients of the backward pass.
Backward, one launch: ``_backward_kernel`` writes dS (and dT when the teacher needs it).

Launch shapes (tiles, warps, grids) come from triton_grid.py.
"""

from __future__ import annotations

import contextlib
import functools
import struct
from dataclasses import dataclass, replace
from typing import Any

import torch
import triton
import triton.language as tl

from .. import layout
from .device_tables import TABLES
from .triton_grid import (
    JitOccupancy,
    Target,
    backward_tile,
    chunking,
    max_tiles_per_chunk,
    one_program,
    stats_tile,
)

# Triton kernels may read only constexpr globals.
C = tl.constexpr

# Layer table columns (int64), one row per layer.
S_PTR, T_PTR, MASK_PTR, N_ROWS, N_DIMS = C(0), C(1), C(2), C(3), C(4)
S_ROW, S_COL, T_ROW, T_COL = C(5), C(6), C(7), C(8)
LAYER_FIELDS = C(9)
# Gradient table columns (int64), one row per layer: where dS and dT go (contiguous (n, d)).
DS_PTR, DT_PTR = C(0), C(1)
GRAD_FIELDS = C(2)

# Chunk partials, (L, chunks, MOMENT_FIELDS, max_d) in the accumulation dtype (layout.M_*).
P_COUNT, P_PIVOT, P_PIVOT_OFFSET = C(layout.M_COUNT), C(layout.M_PIVOT), C(layout.M_PIVOT_OFFSET)
P_M2, P_SQUARED_ERROR = C(layout.M_M2), C(layout.M_SQUARED_ERROR)
PARTIAL_FIELDS = C(layout.MOMENT_FIELDS)

# Per-dim statistics (eofd_kernels.layout).
D_COUNT, D_PIVOT, D_PIVOT_OFFSET = C(layout.D_COUNT), C(layout.D_PIVOT), C(layout.D_PIVOT_OFFSET)
D_SIGMA, D_SQUARED_ERROR = C(layout.D_SIGMA), C(layout.D_SQUARED_ERROR)
D_WEIGHT, D_COEF_S, D_COEF_T = C(layout.D_WEIGHT), C(layout.D_COEF_S), C(layout.D_COEF_T)
DIM_FIELDS = C(layout.DIM_FIELDS)

# The pivot scan reads a whole chunk's mask flags at once.
SCAN_ROWS = C(layout.MAX_CHUNK_ROWS)

# Programs the interpreter aims at in all (triton_grid.py); tests raise it to exercise the
# chunk merge.
INTERPRETER_PROGRAMS = 1

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
def _program_position(BLOCK_D: tl.constexpr):
    """A (chunk, dim block, layer) program's chunk, layer, and its block's dims."""
    chunk = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(2).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    return chunk, layer, cols


@triton.jit
def _layer_view(layers, layer, cols, S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr,
                BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
    """A layer's table row, loaded once: S and T base pointers and strides, its mask (a null
    pointer when the layer has none), d, the rows this program's dims may touch and which
    of its dims lie inside the layer.

    ALIGNED (the host checked: 16-byte aligned bases, row strides a multiple of 16 bytes,
    unit column strides, d a multiple of BLOCK_D): a block of dims is wholly in or out of
    the layer, so a block past d acts as if the layer had no rows, and the bound of a tile is
    constant along its rows: a mask that 16-byte vectors can use."""
    row = layers + layer * LAYER_FIELDS
    s_base = tl.load(row + S_PTR).to(tl.pointer_type(S_DTYPE))
    t_base = tl.load(row + T_PTR).to(tl.pointer_type(T_DTYPE))
    mask_ptr = tl.load(row + MASK_PTR)
    n = tl.load(row + N_ROWS)
    d = tl.load(row + N_DIMS)
    if ALIGNED:
        n = tl.where(tl.program_id(1).to(tl.int64) * BLOCK_D < d, n, 0)
    return (s_base, tl.load(row + S_ROW), tl.load(row + S_COL), t_base, tl.load(row + T_ROW),
            tl.load(row + T_COL), mask_ptr, d, n, cols < d)


@triton.jit
def _tile_pointers(base, rows, cols, row_stride, col_stride, BLOCK_D: tl.constexpr,
                   ALIGNED: tl.constexpr):
    """Pointers of ``rows x cols``. ALIGNED tells the compiler what the host checked, which
    is what makes its loads and stores 16-byte vectors: the base pointer comes from the
    int64 table, so it could not know on its own."""
    if ALIGNED:
        ptrs = base + rows[:, None] * row_stride + cols[None, :]
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [16, 16]), [1, BLOCK_D])
    else:
        ptrs = base + rows[:, None] * row_stride + cols[None, :] * col_stride
    return ptrs


@triton.jit
def _valid_rows(mask_ptr, rows, n, HAS_MASK: tl.constexpr):
    """Which of ``rows`` are valid tokens of the layer: in range, and set in its mask. The
    mask is read first, so that rows of padding need not be loaded at all."""
    valid = rows < n
    if HAS_MASK:
        # Scalar conditions enter masks as bounds (the interpreter cannot `&` a scalar in).
        flags = tl.load(mask_ptr.to(tl.pointer_type(tl.int8)) + rows,
                        mask=rows < tl.where(mask_ptr != 0, n, 0), other=1)
        valid = valid & (flags != 0)
    return valid


@triton.jit
def _tile_mask(row_ok, col_ok, ALIGNED: tl.constexpr):
    """The elements of a tile to touch: ``row_ok`` rows, and (unless ALIGNED, where the whole
    block is inside) ``col_ok`` dims."""
    if ALIGNED:
        inside = tl.broadcast_to(row_ok[:, None], (row_ok.shape[0], col_ok.shape[0]))
    else:
        inside = row_ok[:, None] & col_ok[None, :]
    return inside


@triton.jit
def _load_tile(s_base, s_row, s_col, t_base, t_row, t_col, mask_ptr, rows, cols, end_row,
               col_ok, HAS_MASK: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
    """Which of ``rows`` (below ``end_row``) are valid tokens, and S and T there in their
    own dtypes (0 elsewhere: rows of padding are not loaded)."""
    valid = _valid_rows(mask_ptr, rows, end_row, HAS_MASK)
    load = _tile_mask(valid, col_ok, ALIGNED)
    s = tl.load(_tile_pointers(s_base, rows, cols, s_row, s_col, BLOCK_D, ALIGNED), mask=load,
                other=0.0)
    t = tl.load(_tile_pointers(t_base, rows, cols, t_row, t_col, BLOCK_D, ALIGNED), mask=load,
                other=0.0)
    return valid, s, t


@triton.jit
def _accumulate(lane_count, lane_mean, lane_m2, lane_squared_error, valid, s_raw, t_raw, pivot,
                ACC: tl.constexpr):
    """One row of values per lane into the lanes' running moments: Welford's update of the
    mean offset from the column's pivot and of M2, and the sum of (S - T)^2."""
    s = s_raw.to(ACC)
    t = t_raw.to(ACC)
    diff = s - t  # 0 where nothing was loaded
    lane_squared_error += diff * diff
    lane_count += valid.to(ACC)
    inv_count = 1.0 / tl.maximum(lane_count, 1.0)
    # A row that is not a valid token takes u = lane_mean: delta = 0, a no-op update.
    u = tl.where(valid[:, None], t - pivot[None, :], lane_mean)
    delta = u - lane_mean
    lane_mean += delta * inv_count[:, None]
    lane_m2 += delta * (u - lane_mean)
    return lane_count, lane_mean, lane_m2, lane_squared_error


@triton.jit
def _pivot_row(mask_ptr, first_row, end_row, HAS_MASK: tl.constexpr,
               SCAN_ROWS: tl.constexpr):
    """The chunk's first valid row in ``[first_row, end_row)`` (``end_row`` if none): its T
    values are the pivots of the chunk's columns (docs/design.md, "Pivoted moments")."""
    if HAS_MASK:
        offsets = tl.arange(0, SCAN_ROWS)
        in_chunk = offsets < end_row - first_row
        flags = tl.load(mask_ptr.to(tl.pointer_type(tl.int8)) + first_row + offsets,
                        mask=offsets < tl.where(mask_ptr != 0, end_row - first_row, 0),
                        other=1)
        first = tl.min(tl.where(in_chunk & (flags != 0), offsets, SCAN_ROWS), axis=0)
        return tl.minimum(first_row + first.to(tl.int64), end_row)
    return first_row


@triton.jit(do_not_specialize=["num_chunks", "tiles_per_chunk"])
def _stats_kernel(
    layers, partials, max_d, num_chunks, tiles_per_chunk,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, ACC: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr,
    SCAN_ROWS: tl.constexpr,
):
    chunk, layer, cols = _program_position(BLOCK_D)
    s_base, s_row, s_col, t_base, t_row, t_col, mask_ptr, d, n, col_ok = _layer_view(
        layers, layer, cols, S_DTYPE, T_DTYPE, BLOCK_D, ALIGNED)
    first_row = chunk * tiles_per_chunk * BLOCK_N
    end_row = tl.minimum(first_row + tiles_per_chunk * BLOCK_N, n)

    # One pivot per column for the whole chunk: an actual valid T value, so every deviation
    # x - pivot is small next to |mean| and exact in the accumulation dtype where it matters.
    pivot_row = _pivot_row(mask_ptr, first_row, end_row, HAS_MASK, SCAN_ROWS)
    pivot = tl.load(t_base + pivot_row * t_row + cols * t_col,
                    mask=cols < tl.where(pivot_row < end_row, d, 0), other=0.0).to(ACC)

    # Running moments per element of a half tile, the lanes (Welford's update around the
    # column's pivot); the lanes' rows are summed only once, after the loop. Each trip issues
    # the loads of both halves of its tile before it uses either, so a thread has a whole
    # tile's loads in flight while it holds accumulators for half of it.
    LANES: tl.constexpr = BLOCK_N // 2
    lane_rows = tl.arange(0, LANES).to(tl.int64)
    lane_count = tl.zeros((LANES,), ACC)
    lane_mean = tl.zeros((LANES, BLOCK_D), ACC)
    lane_m2 = tl.zeros((LANES, BLOCK_D), ACC)
    lane_squared_error = tl.zeros((LANES, BLOCK_D), ACC)
    for tile in range(tiles_per_chunk):
        rows = first_row + tile * BLOCK_N + lane_rows
        valid_a, s_a, t_a = _load_tile(s_base, s_row, s_col, t_base, t_row, t_col, mask_ptr,
                                       rows, cols, end_row, col_ok, HAS_MASK, BLOCK_D, ALIGNED)
        valid_b, s_b, t_b = _load_tile(s_base, s_row, s_col, t_base, t_row, t_col, mask_ptr,
                                       rows + LANES, cols, end_row, col_ok, HAS_MASK, BLOCK_D,
                                       ALIGNED)
        lane_count, lane_mean, lane_m2, lane_squared_error = _accumulate(
            lane_count, lane_mean, lane_m2, lane_squared_error, valid_a, s_a, t_a, pivot, ACC)
        lane_count, lane_mean, lane_m2, lane_squared_error = _accumulate(
            lane_count, lane_mean, lane_m2, lane_squared_error, valid_b, s_b, t_b, pivot, ACC)

    # Merge the lanes (all around the same pivot): an exact two-pass over their summaries.
    count = tl.sum(lane_count, axis=0)
    lane_weight = lane_count[:, None]
    has_rows = lane_weight > 0
    mean = tl.sum(tl.where(has_rows, lane_weight * lane_mean, 0.0), axis=0) / tl.maximum(
        count, 1.0)
    spread = lane_mean - mean[None, :]
    m2 = tl.sum(tl.where(has_rows, lane_m2 + lane_weight * spread * spread, 0.0), axis=0)
    squared_error = tl.sum(lane_squared_error, axis=0)

    out = partials + (layer * num_chunks + chunk) * PARTIAL_FIELDS * max_d + cols
    keep = cols < max_d
    tl.store(out + P_COUNT * max_d, tl.zeros((BLOCK_D,), ACC) + count, mask=keep)
    tl.store(out + P_PIVOT * max_d, pivot, mask=keep)
    tl.store(out + P_PIVOT_OFFSET * max_d, mean, mask=keep)
    tl.store(out + P_M2 * max_d, m2, mask=keep)
    tl.store(out + P_SQUARED_ERROR * max_d, squared_error, mask=keep)


@triton.jit(do_not_specialize=["num_chunks", "chunk_rows"])
def _merge_chunks_kernel(layers, partials, dim_stats, max_d, num_chunks, chunk_rows,
                         BLOCK_D: tl.constexpr):
    dblock = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    row = layers + layer * LAYER_FIELDS
    n = tl.load(row + N_ROWS)
    d = tl.load(row + N_DIMS)
    cols = dblock * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    keep = cols < max_d

    count = tl.zeros((BLOCK_D,), tl.float64)
    pivot = tl.zeros((BLOCK_D,), tl.float64)
    mean = tl.zeros((BLOCK_D,), tl.float64)
    m2 = tl.zeros((BLOCK_D,), tl.float64)
    squared_error = tl.zeros((BLOCK_D,), tl.float64)
    for chunk in range(0, tl.cdiv(n, chunk_rows)):
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
def _dim_weights(stats, cols, d, max_d, scale, power):
    """sigma_d, E_d and w_d of ``cols`` (0 past d): a pure function of the merged statistics,
    so the two loops that need w_d compute the same bits without passing them through
    memory."""
    in_layer = cols < d
    sigma = tl.load(stats + D_SIGMA * max_d + cols, mask=in_layer, other=1.0)
    squared_error = tl.load(stats + D_SQUARED_ERROR * max_d + cols, mask=in_layer, other=0.0)
    weight = tl.where(in_layer, _power(sigma / scale, power), 0.0)
    return in_layer, sigma, squared_error, weight


@triton.jit(do_not_specialize=["power_bits", "eps_bits"])
def _finalize_layers_kernel(layers, dim_stats, losses, max_d, power_bits, eps_bits,
                            BLOCK_D: tl.constexpr):
    layer = tl.program_id(0).to(tl.int64)
    # p and eps arrive as float64 bit patterns: a Python float argument would become fp32.
    power = power_bits.to(tl.int64).to(tl.float64, bitcast=True)
    eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
    d = tl.load(layers + layer * LAYER_FIELDS + N_DIMS)
    stats = dim_stats + layer * DIM_FIELDS * max_d
    n_valid = tl.load(stats + D_COUNT * max_d)
    offs = tl.arange(0, BLOCK_D).to(tl.int64)

    sigma_sum = tl.zeros((BLOCK_D,), tl.float64)
    for start in range(0, d, BLOCK_D):
        sigma_sum += tl.load(stats + D_SIGMA * max_d + start + offs, mask=start + offs < d,
                             other=0.0)
    scale = tl.sum(sigma_sum, axis=0) / d + eps  # sbar + eps
    inv_nd = 1.0 / (n_valid * d)

    weighted_sum = tl.zeros((BLOCK_D,), tl.float64)
    for start in range(0, max_d, BLOCK_D):
        cols = start + offs
        in_layer, sigma, squared_error, weight = _dim_weights(stats, cols, d, max_d, scale,
                                                              power)
        weighted_sum += weight * squared_error
        tl.store(stats + D_WEIGHT * max_d + cols, weight, mask=cols < max_d)
        tl.store(stats + D_COEF_S * max_d + cols, 2.0 * weight * inv_nd, mask=cols < max_d)
    weighted = tl.sum(weighted_sum, axis=0)
    tl.store(losses + layer, (weighted * inv_nd).to(losses.dtype.element_ty))

    # dT through the weights (docs/design.md, "Gradients"): coef_t = G_d / ((n' - 1) sigma_d).
    mean_term = weighted / (d * scale)
    for start in range(0, max_d, BLOCK_D):
        cols = start + offs
        in_layer, sigma, squared_error, weight = _dim_weights(stats, cols, d, max_d, scale,
                                                              power)
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


@triton.jit(do_not_specialize=["tiles_per_chunk"])
def _backward_kernel(
    layers, grads, dim_stats, grad_losses, max_d, tiles_per_chunk,
    S_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, ACC: tl.constexpr, HAS_MASK: tl.constexpr,
    NEED_DT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFT_BF16: tl.constexpr, ALIGNED: tl.constexpr,
):
    chunk, layer, cols = _program_position(BLOCK_D)
    s_base, s_row, s_col, t_base, t_row, t_col, mask_ptr, d, n, col_ok = _layer_view(
        layers, layer, cols, S_DTYPE, T_DTYPE, BLOCK_D, ALIGNED)
    grad_row = grads + layer * GRAD_FIELDS
    ds_base = tl.load(grad_row + DS_PTR).to(tl.pointer_type(S_DTYPE))
    dt_base = tl.load(grad_row + DT_PTR).to(tl.pointer_type(T_DTYPE))
    stats = dim_stats + layer * DIM_FIELDS * max_d + cols
    g = tl.load(grad_losses + layer).to(ACC)
    coef_s = (g * tl.load(stats + D_COEF_S * max_d, mask=col_ok, other=0.0)).to(ACC)[None, :]
    coef_t = (g * tl.load(stats + D_COEF_T * max_d, mask=col_ok, other=0.0)).to(ACC)[None, :]
    pivot = tl.load(stats + D_PIVOT * max_d, mask=col_ok, other=0.0).to(ACC)[None, :]
    mean = tl.load(stats + D_PIVOT_OFFSET * max_d, mask=col_ok, other=0.0).to(ACC)[None, :]

    tile_rows = tl.arange(0, BLOCK_N).to(tl.int64)
    first_row = chunk * tiles_per_chunk * BLOCK_N
    for tile in range(tiles_per_chunk):
        rows = first_row + tile * BLOCK_N + tile_rows
        valid, s_raw, t_raw = _load_tile(s_base, s_row, s_col, t_base, t_row, t_col, mask_ptr,
                                         rows, cols, n, col_ok, HAS_MASK, BLOCK_D, ALIGNED)
        s = s_raw.to(ACC)
        t = t_raw.to(ACC)
        store = _tile_mask(rows < n, col_ok, ALIGNED)
        load = _tile_mask(valid, col_ok, ALIGNED)
        # Padding rows get 0 by selection (their coefficients may be NaN, never their values).
        ds = tl.where(load, coef_s * (s - t), 0.0)
        # Gradients are written contiguous (n, d), from fresh (aligned) allocations.
        tl.store(_tile_pointers(ds_base, rows, cols, d, 1, BLOCK_D, ALIGNED),
                 _round_to(ds, S_DTYPE, SOFT_BF16), mask=store)
        if NEED_DT:
            dt = tl.where(load, coef_t * ((t - pivot) - mean) - ds, 0.0)
            tl.store(_tile_pointers(dt_base, rows, cols, d, 1, BLOCK_D, ALIGNED),
                     _round_to(dt, T_DTYPE, SOFT_BF16), mask=store)


# ----------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a plan: ``kernel[grid](*args, **options, **constexprs)``.
    Exposed so that a test can compile exactly what a GPU would run, ahead of time
    (triton_aot.py)."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    options: dict  # compile options: num_warps, maxnreg

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.options, **self.constexprs)


@functools.cache
def _gpu_target(device: torch.device) -> Target:
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return Target(sms, False, JitOccupancy(device))


def target_of(device: torch.device) -> Target:
    """The launch target of tensors on ``device``: its GPU, or the interpreter."""
    if device.type == "cuda":
        return _gpu_target(device)
    return Target(INTERPRETER_PROGRAMS, True, one_program)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _table(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 table on ``device`` (device_tables.py for a GPU)."""
    if device.type == "cuda":
        return TABLES.get(tuple(values), device)
    return torch.tensor(values, dtype=torch.int64)


def _layer_table(students, teachers, masks) -> torch.Tensor:
    """The ``(L * LAYER_FIELDS,)`` int64 layer table on the layers' device."""
    values = []
    for s, t, m in zip(students, teachers, masks):
        values += [s.data_ptr(), t.data_ptr(), 0 if m is None else m.data_ptr(),
                   s.shape[0], s.shape[1], s.stride(0), s.stride(1), t.stride(0), t.stride(1)]
    return _table(values, students[0].device)


def _grad_table(d_students, d_teachers) -> torch.Tensor:
    """The ``(L * GRAD_FIELDS,)`` int64 table of where dS (and dT) go."""
    values = []
    for i, ds in enumerate(d_students):
        values += [ds.data_ptr(), d_teachers[i].data_ptr() if d_teachers else 0]
    return _table(values, d_students[0].device)


def _aligned(layers, block_d: int) -> bool:
    """Whether every ``(n, d)`` layer allows 16-byte vector access (see _layer_view)."""
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


def _tile(choose, students, teachers, target: Target):
    """The tile ``choose`` (stats_tile or backward_tile) gives a call, and the number of its
    row tiles the longest layer has."""
    element_bytes = max(x.element_size() for x in (students[0], teachers[0]))
    tile = choose(max(s.shape[1] for s in students), element_bytes, target.interpreter)
    return tile, triton.cdiv(max(s.shape[0] for s in students), tile.block_n)


def _with_chunks(launch: Launch, row_tiles: int, block_n: int, target: Target):
    """``launch`` with its grid's chunk count and tiles per chunk (triton_grid.chunking) for
    the occupancy of its compiled kernel; ``launch.grid`` holds the other two grid axes."""
    dblocks, num_layers = launch.grid
    resident = target.resident_programs(launch.kernel, launch.args, launch.constexprs,
                                        launch.options)
    tiles_per_chunk, num_chunks = chunking(row_tiles, dblocks * num_layers, resident,
                                           max_tiles_per_chunk(block_n))
    return tiles_per_chunk, num_chunks


def plan_forward(students, teachers, masks, power: float, eps: float, target: Target):
    """The forward's launches, and the ``(losses, dim_stats)`` they will write.

    students, teachers: ``[(n_l, d_l)]`` rows with one dtype each across layers;
    masks: ``[(n_l,)]`` bool contiguous or None.
    """
    device = students[0].device
    num_layers = len(students)
    max_d = max(s.shape[1] for s in students)
    tiles, row_tiles = _tile(stats_tile, students, teachers, target)
    opts = _common(students, teachers, masks)
    acc_dtype = torch.float64 if opts["ACC"] == tl.float64 else torch.float32
    table = _layer_table(students, teachers, masks)
    dblocks = triton.cdiv(max_d, tiles.block_d)
    stats_constexprs = dict(BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
                            ALIGNED=_aligned(students + teachers, tiles.block_d),
                            SCAN_ROWS=SCAN_ROWS.value, **opts)
    # The stats kernel's compiled variant does not depend on its grid (num_chunks and
    # tiles_per_chunk are not specialised on), so its occupancy is known before the grid.
    probe = Launch(_stats_kernel, (dblocks, num_layers),
                   (table, torch.empty(0, dtype=acc_dtype, device=device), max_d, 1, 1),
                   stats_constexprs, tiles.options)
    tiles_per_chunk, num_chunks = _with_chunks(probe, row_tiles, tiles.block_n, target)
    partials = torch.empty((num_layers, num_chunks, PARTIAL_FIELDS.value, max_d),
                           dtype=acc_dtype, device=device)
    dim_stats = torch.empty((num_layers, layout.DIM_FIELDS, max_d), dtype=torch.float64,
                            device=device)
    losses = torch.empty(num_layers, dtype=acc_dtype, device=device)
    launches = [
        replace(probe, grid=(num_chunks, dblocks, num_layers),
                args=(table, partials, max_d, num_chunks, tiles_per_chunk)),
        Launch(_merge_chunks_kernel, (dblocks, num_layers),
               (table, partials, dim_stats, max_d, num_chunks, tiles_per_chunk * tiles.block_n),
               dict(BLOCK_D=tiles.block_d), dict(num_warps=tiles.num_warps)),
        Launch(_finalize_layers_kernel, (num_layers,),
               (table, dim_stats, losses, max_d, _float_bits(power), _float_bits(eps)),
               dict(BLOCK_D=min(triton.next_power_of_2(max_d), 1024)), dict(num_warps=4)),
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
    max_d = dim_stats.shape[-1]
    tiles, row_tiles = _tile(backward_tile, students, teachers, target)
    args = (_layer_table(students, teachers, masks), _grad_table(d_students, d_teachers),
            dim_stats, grad_losses.contiguous(), max_d)
    launch = Launch(
        _backward_kernel, (triton.cdiv(max_d, tiles.block_d), num_layers), args + (1,),
        dict(NEED_DT=need_teacher_grad, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
             SOFT_BF16=target.interpreter, ALIGNED=_aligned(students + teachers, tiles.block_d),
             **_common(students, teachers, masks)),
        tiles.options)
    tiles_per_chunk, num_chunks = _with_chunks(launch, row_tiles, tiles.block_n, target)
    launch = replace(launch, grid=(num_chunks,) + launch.grid, args=args + (tiles_per_chunk,))
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
                                         target_of(device))
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
            target_of(device))
        for launch in launches:
            launch()
    return ([g.view(s.shape) for g, s in zip(d_students, students)],
            [g.view(t.shape) for g, t in zip(d_teachers, teachers)])
