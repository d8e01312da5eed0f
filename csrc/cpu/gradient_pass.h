// The gradient pass: dS (and dT) rows from the per-dim coefficients, for the backward op
// and for the training forward, which also sums (S - T)^2 in the statistics pass's tiles
// (docs/design.md, "Backward pass" and "The CPU training step").
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../include/eofd_params.h"
#include "element.h"
#include "stream_store.h"
#include "tiles.h"

namespace eofd {

// The backward's per-dim vectors of one layer, in acc_t: g * coef_s, g * coef_t, pivot, mean.
template <typename acc_t>
struct BackwardCoefs {
  const acc_t* coef_s;
  const acc_t* coef_t;
  const acc_t* pivot;
  const acc_t* mean;
};

// Elements per streamed piece of a gradient row. Each piece is computed into an L1 buffer and
// streamed out at once, so streaming stores and loads of S and T interleave: streaming a whole
// row after computing it stalls on the write-combining buffers.
constexpr int64_t kPieceElems = 64;

// dS (and dT when `dt` is not null) of one valid row, each in its side's element type
// (computed in the pair's acc_t, rounded once). With AddSquares (dS only), also
// sq[j] += (S - T)^2.
template <bool AddSquares, typename s_elem, typename t_elem, typename acc_t>
void backward_row(const BackwardCoefs<acc_t>& c, const s_elem* s, const t_elem* t, s_elem* ds,
                  t_elem* dt, int64_t d, acc_t* __restrict__ sq = nullptr) {
  alignas(64) s_elem ds_piece[kPieceElems];
  alignas(64) t_elem dt_piece[kPieceElems];
  for (int64_t j0 = 0; j0 < d; j0 += kPieceElems) {
    const int64_t width = std::min(kPieceElems, d - j0);
    const s_elem* __restrict__ sj = s + j0;
    const t_elem* __restrict__ tj = t + j0;
    const acc_t* __restrict__ coef_s = c.coef_s + j0;
    if (dt == nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const acc_t e = widen(sj[j]) - widen(tj[j]);
        ds_piece[j] = narrow<s_elem>(coef_s[j] * e);
        if constexpr (AddSquares) sq[j0 + j] += e * e;
      }
    } else {
      const acc_t* __restrict__ coef_t = c.coef_t + j0;
      const acc_t* __restrict__ pivot = c.pivot + j0;
      const acc_t* __restrict__ mean = c.mean + j0;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const acc_t t_j = widen(tj[j]);
        const acc_t g_s = coef_s[j] * (widen(sj[j]) - t_j);
        ds_piece[j] = narrow<s_elem>(g_s);
        dt_piece[j] = narrow<t_elem>(coef_t[j] * ((t_j - pivot[j]) - mean[j]) - g_s);
      }
      stream_copy(dt + j0, dt_piece, width * sizeof(t_elem));
    }
    stream_copy(ds + j0, ds_piece, width * sizeof(s_elem));
  }
}

// g * coef_s of one layer (its dim_stats rows `stats`) for incoming grad g, formed in fp64 and
// rounded once: the forward's gradient pass and the backward give the same bits for the same g.
template <typename acc_t>
void fill_student_coefs(const double* stats, double g, int64_t max_d, acc_t* coef_s) {
  for (int64_t j = 0; j < max_d; ++j) coef_s[j] = static_cast<acc_t>(g * stats[kCoefS * max_d + j]);
}

// The backward's per-dim vectors of one layer for incoming grad g (BackwardCoefs' order).
template <typename acc_t>
void fill_coefs(const double* stats, double g, int64_t max_d, acc_t* coefs) {
  fill_student_coefs(stats, g, max_d, coefs);
  for (int64_t j = 0; j < max_d; ++j) {
    coefs[max_d + j] = static_cast<acc_t>(g * stats[kCoefT * max_d + j]);
    coefs[2 * max_d + j] = static_cast<acc_t>(stats[kPivot * max_d + j]);
    coefs[3 * max_d + j] = static_cast<acc_t>(stats[kPivotOffset * max_d + j]);
  }
}

// dS (and dT when need_teacher_grad) of the rows of chunk `ch`, from fill_coefs' vectors.
template <typename s_elem, typename t_elem, typename acc_t>
void backward_chunk(const LayerParams& p, const Chunk& ch, const acc_t* coefs, int64_t max_d,
                    bool need_teacher_grad) {
  const BackwardCoefs<acc_t> c{coefs, coefs + max_d, coefs + 2 * max_d, coefs + 3 * max_d};
  const int64_t d = p.d;
  for (int64_t r = ch.row_begin; r < ch.row_end; ++r) {
    auto* ds = static_cast<s_elem*>(p.grad_student) + r * d;
    auto* dt = need_teacher_grad ? static_cast<t_elem*>(p.grad_teacher) + r * d : nullptr;
    if (p.mask != nullptr && !p.mask[r]) {
      std::fill(ds, ds + d, narrow<s_elem>(acc_t(0)));
      if (dt != nullptr) std::fill(dt, dt + d, narrow<t_elem>(acc_t(0)));
      continue;
    }
    backward_row<false>(c, static_cast<const s_elem*>(p.student) + r * p.student_row,
                        static_cast<const t_elem*>(p.teacher) + r * p.teacher_row, ds, dt, d);
  }
}

// The forward's gradient pass over a chunk's valid rows, row by row (see student_grad_chunk):
// dS from g * coef_s, and each tile's squares summed into an L1 buffer, then into squared_error.
template <typename s_elem, typename t_elem, typename acc_t>
void student_grad_rows(const LayerParams& p, const ValidRows<s_elem, t_elem>& rows,
                       const acc_t* coef_s, acc_t* squared_error) {
  const BackwardCoefs<acc_t> c{coef_s, nullptr, nullptr, nullptr};
  const int64_t d = p.d;
  auto* dS = static_cast<s_elem*>(p.grad_student);
  std::vector<acc_t> tile_sq(d);
  for_each_tile(rows.count, [&](auto tile_rows, int k, int) {
    std::fill(tile_sq.begin(), tile_sq.end(), acc_t(0));
    for (int q = k; q < k + decltype(tile_rows)::value; ++q) {
      backward_row<true, s_elem, t_elem>(c, rows.s[q], rows.t[q], dS + rows.index[q] * d,
                                         nullptr, d, tile_sq.data());
    }
    if (k == 0) {
      std::copy(tile_sq.begin(), tile_sq.end(), squared_error);
    } else {
      for (int64_t j = 0; j < d; ++j) squared_error[j] += tile_sq[j];
    }
  });
}

// dS of a tile of R valid rows (ds: their dS rows), and its sum of (S - T)^2 merged into the
// chunk's squared_error as add_tile merges it (First: the chunk's first tile). A piece of each row is
// computed into an L1 buffer and streamed out; the squares stay in registers. Like add_tile,
// it prefetches the next tile's rows into L2.
template <int R, bool First, typename s_elem, typename t_elem, typename acc_t>
__attribute__((noinline)) void student_grad_tile(Rows<R, s_elem> s, Rows<R, t_elem> t,
                                                 Rows<R, s_elem> next_s, Rows<R, t_elem> next_t,
                                                 s_elem* const* ds, const acc_t* coef_s,
                                                 int64_t d, acc_t* __restrict__ squared_error) {
  alignas(64) s_elem piece[R][kPieceElems];
  for (int64_t j0 = 0; j0 < d; j0 += kPieceElems) {
    const int64_t width = std::min(kPieceElems, d - j0);
    for (int64_t line = j0; line < j0 + width; line += kLineElems<s_elem, t_elem>) {
#pragma GCC unroll 8
      for (int q = 0; q < R; ++q) {
        __builtin_prefetch(next_s.row[q] + line, 0, 2);
        __builtin_prefetch(next_t.row[q] + line, 0, 2);
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const acc_t coef = coef_s[j0 + j];
      acc_t sq = 0;
#pragma GCC unroll 8
      for (int q = 0; q < R; ++q) {
        const acc_t e = widen(s.row[q][j0 + j]) - widen(t.row[q][j0 + j]);
        piece[q][j] = narrow<s_elem>(coef * e);
        sq += e * e;
      }
      if constexpr (First) {
        squared_error[j0 + j] = sq;
      } else {
        squared_error[j0 + j] += sq;
      }
    }
    for (int q = 0; q < R; ++q) stream_copy(ds[q] + j0, piece[q], width * sizeof(s_elem));
  }
}

// The forward's gradient pass over a chunk's valid rows, a tile at a time (see
// student_grad_chunk).
template <typename s_elem, typename t_elem, typename acc_t>
void student_grad_tiles(const LayerParams& p, const ValidRows<s_elem, t_elem>& rows,
                        const acc_t* coef_s, acc_t* squared_error) {
  const int64_t d = p.d;
  auto* dS = static_cast<s_elem*>(p.grad_student);
  s_elem* ds_rows[kChunkRows];
  for (int k = 0; k < rows.count; ++k) ds_rows[k] = dS + rows.index[k] * d;
  for_each_tile(rows.count, [&](auto tile_rows, int k, int next) {
    constexpr int R = decltype(tile_rows)::value;
    const auto s = rows_at<R>(rows.s + k);
    const auto t = rows_at<R>(rows.t + k);
    const auto next_s = rows_at<R>(rows.s + k + next);
    const auto next_t = rows_at<R>(rows.t + k + next);
    if (k == 0) {
      student_grad_tile<R, true>(s, t, next_s, next_t, ds_rows + k, coef_s, d, squared_error);
    } else {
      student_grad_tile<R, false>(s, t, next_s, next_t, ds_rows + k, coef_s, d, squared_error);
    }
  });
}

// The forward's gradient pass over chunk `ch`: dS from g * coef_s (zeros for masked rows), and
// the sum of (S - T)^2 that its statistics chunk left out, into the chunk's partial. The sum
// goes in chunk_stats' tiles (kTileRows valid rows, then single rows; a tile's squares summed
// in row order, then added to the chunk's), so it has the bits of the forward without
// gradients. Two loop orders, each the faster for its element size (docs/performance.md):
// 16-bit elements go a tile at a time with the squares in registers, wider ones (a side wider
// than 16 bits) row by row, where two read streams beat the tile's 16.
template <typename s_elem, typename t_elem, typename acc_t>
void student_grad_chunk(const LayerParams& p, const Chunk& ch, const acc_t* coef_s,
                        acc_t* partial) {
  const int64_t d = p.d;
  if (p.mask != nullptr) {
    auto* dS = static_cast<s_elem*>(p.grad_student);
    for (int64_t r = ch.row_begin; r < ch.row_end; ++r) {
      if (!p.mask[r]) std::fill(dS + r * d, dS + (r + 1) * d, narrow<s_elem>(acc_t(0)));
    }
  }
  ValidRows<s_elem, t_elem> rows;
  gather_valid_rows(p, ch.row_begin, ch.row_end, rows);
  if constexpr (std::max(sizeof(s_elem), sizeof(t_elem)) == 2) {
    student_grad_tiles(p, rows, coef_s, partial + 3 * d);
  } else {
    student_grad_rows(p, rows, coef_s, partial + 3 * d);
  }
}

}  // namespace eofd
