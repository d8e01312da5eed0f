// The statistics pass: per chunk and dim, the valid-token count, a pivoted mean pair and M2
// of T (exact two-pass per tile, tiles merged with Chan's formula) and the sum of (S - T)^2
// (docs/design.md, "Statistics pass" and "Numerics").
#pragma once

#include <algorithm>
#include <cstdint>

#include "../include/eofd_params.h"
#include "element.h"
#include "tiles.h"

namespace eofd {

// One tile of R rows, merged into the chunk's statistics (docs/design.md, pivoted means):
// tile pivot k = T's first row, m = mean(T - k), M2 = sum((T - k) - m)^2, then Chan's merge
// (First: the chunk's first tile, taken whole), and with SqErr squared_error += sum (S - T)^2
// (without it S is not read: the forward's gradient pass sums it, student_grad_chunk).
// frac = R / (count + R), cross = count * frac, count being the chunk's rows so far: the merge
// is chan_merge_nonempty with its count-only factors hoisted out of the loop (divisions per
// dim would dominate the pass). While it reads a line of each row, it prefetches the
// same line of each row of the next tile (next_s, next_t) into L2: the hardware prefetchers do
// not keep 2R interleaved streams ahead (docs/performance.md). S and T are read as their own
// element types (s_elem, t_elem), widened to the pair's acc_t (Accumulator) exactly.
template <int R, bool First, bool SqErr, typename s_elem, typename t_elem, typename acc_t>
__attribute__((noinline)) void add_tile(Rows<R, s_elem> s, Rows<R, t_elem> t,
                                        Rows<R, s_elem> next_s, Rows<R, t_elem> next_t,
                                        int64_t d, acc_t frac, acc_t cross,
                                        acc_t* __restrict__ pivot, acc_t* __restrict__ mean,
                                        acc_t* __restrict__ m2, acc_t* __restrict__ squared_error) {
  constexpr acc_t inv_rows = acc_t(1) / R;
  constexpr int64_t kLine = kLineElems<s_elem, t_elem>;
  for (int64_t j0 = 0; j0 < d; j0 += kLine) {
#pragma GCC unroll 8
    for (int q = 0; q < R; ++q) {
      if constexpr (SqErr) __builtin_prefetch(next_s.row[q] + j0, 0, 2);  // into L2 (prefetcht1)
      __builtin_prefetch(next_t.row[q] + j0, 0, 2);
    }
    const int64_t j_end = std::min(j0 + kLine, d);
#pragma omp simd
    for (int64_t j = j0; j < j_end; ++j) {
      const acc_t k = widen(t.row[0][j]);
      acc_t shifted = 0, sq = 0;
#pragma GCC unroll 8
      for (int q = 0; q < R; ++q) {
        const acc_t tq = widen(t.row[q][j]);
        shifted += tq - k;
        if constexpr (SqErr) {
          const acc_t e = widen(s.row[q][j]) - tq;
          sq += e * e;
        }
      }
      const acc_t m = shifted * inv_rows;
      acc_t dev2 = 0;
#pragma GCC unroll 8
      for (int q = 0; q < R; ++q) {
        const acc_t u = (widen(t.row[q][j]) - k) - m;
        dev2 += u * u;
      }
      if constexpr (First) {
        pivot[j] = k;
        mean[j] = m;
        m2[j] = dev2;
        if constexpr (SqErr) squared_error[j] = sq;
      } else {
        const acc_t delta = (k - pivot[j]) + (m - mean[j]);
        mean[j] += delta * frac;
        m2[j] += dev2 + delta * delta * cross;
        if constexpr (SqErr) squared_error[j] += sq;
      }
    }
  }
}

// Merges the tile of R rows at s_rows / t_rows into the chunk's statistics `out` (laid out as
// in chunk_stats); `count` is the chunk's rows so far. `next` is where the next tile starts in
// the row arrays (the tile itself when there is none).
template <int R, bool SqErr, typename s_elem, typename t_elem, typename acc_t>
void merge_tile(const s_elem* const* s_rows, const t_elem* const* t_rows, int next, int64_t d,
                acc_t count, acc_t* out) {
  const auto s = rows_at<R>(s_rows);
  const auto t = rows_at<R>(t_rows);
  const auto next_s = rows_at<R>(s_rows + next);
  const auto next_t = rows_at<R>(t_rows + next);
  acc_t* pivot = out;
  acc_t* mean = out + d;
  acc_t* m2 = out + 2 * d;
  acc_t* squared_error = out + 3 * d;
  if (count == 0) {
    add_tile<R, true, SqErr>(s, t, next_s, next_t, d, acc_t(0), acc_t(0), pivot, mean, m2, squared_error);
  } else {
    const acc_t frac = acc_t(R) / (count + acc_t(R));
    add_tile<R, false, SqErr>(s, t, next_s, next_t, d, frac, count * frac, pivot, mean, m2, squared_error);
  }
}

// Statistics of rows [row_begin, row_end) (at most kChunkRows) of one layer into `out`:
// [pivot | mean offset | M2 | sum (S - T)^2] (d each; the sum only with SqErr), then the
// valid-token count. Valid rows are merged kTileRows at a time; the last few one by one (a
// one-row tile is Welford's update).
template <bool SqErr, typename s_elem, typename t_elem, typename acc_t>
void chunk_stats(const LayerParams& p, int64_t row_begin, int64_t row_end, acc_t* out) {
  ValidRows<s_elem, t_elem> rows;
  gather_valid_rows(p, row_begin, row_end, rows);
  if (rows.count == 0) std::fill(out, out + 4 * p.d, acc_t(0));  // else the first tile writes
  for_each_tile(rows.count, [&](auto tile_rows, int k, int next) {
    merge_tile<decltype(tile_rows)::value, SqErr>(rows.s + k, rows.t + k, next, p.d,
                                                  static_cast<acc_t>(k), out);
  });
  out[4 * p.d] = static_cast<acc_t>(rows.count);
}

}  // namespace eofd
