// CPU implementation of eofd_ext::forward / backward (same algorithm as the GPU kernels).
//
// Work is split into fixed 256-row chunks per layer, never by thread count, and chunk results
// are merged in chunk order: the bits do not depend on how many threads run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "../layer_table.h"
#include "element.h"
#include "output_pool.h"
#include "stream_store.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace eofd {
namespace {

constexpr int64_t kChunkRows = 256;

// Accumulation type: fp64 for fp64 inputs, else fp32.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

struct Chunk {
  int64_t layer, row_begin, row_end, offset;  // offset of its partial in the workspace
};

// Chunks of every layer, and the size of the partials workspace (4 d + 1 values per chunk).
std::vector<Chunk> make_chunks(const LayerTable& table, int64_t* workspace) {
  std::vector<Chunk> chunks;
  *workspace = 0;
  for (int64_t l = 0; l < static_cast<int64_t>(table.layers.size()); ++l) {
    const LayerParams& p = table.layers[l];
    for (int64_t r = 0; r < p.n; r += kChunkRows) {
      chunks.push_back({l, r, std::min(r + kChunkRows, p.n), *workspace});
      *workspace += 4 * p.d + 1;
    }
  }
  return chunks;
}

// Runs fn(i) for every chunk i on ATen's threads, each thread claiming the next chunk when it is
// free; `done()` then runs once on every thread that took part. Chunks are equal work but the
// cores are not equally fast (memory, a neighbour's load): with a static split, 13% of perf's
// samples of a training-step loop sat in libgomp's barrier wait on the 2-core CI machine.
// Which thread runs a chunk never changes the result: each chunk owns its output.
template <typename Fn, typename Done>
void parallel_over_chunks(int64_t num_chunks, const Fn& fn, const Done& done) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < num_chunks; i = next++) fn(i);
    done();
  });
}

// Busy-wait hint while a thread waits for another's finalize (a few microseconds at most).
inline void spin_pause() {
#if defined(__SSE2__)
  _mm_pause();
#endif
}

// Rows per tile: the tile's exact two-pass statistics are computed in registers (each vector of
// dims holds its kTileRows values of T), so S and T are read from memory once.
constexpr int kTileRows = 8;

// R row pointers, passed by value: GCC then keeps them in registers; read through an array in
// memory it re-loads them in the loop and vectorizes the rows' loads as gathers (4x slower).
template <int R, typename elem_t>
struct Rows {
  const elem_t* row[R];
};

template <int R, typename elem_t>
Rows<R, elem_t> rows_at(const elem_t* const* rows) {
  Rows<R, elem_t> out;
  std::copy(rows, rows + R, out.row);
  return out;
}

// Elements of a row per 64-byte cache line: the tile loop goes a line of every row at a time.
template <typename elem_t>
constexpr int64_t kLineElems = 64 / sizeof(elem_t);

// One tile of R rows, merged into the chunk's statistics (DESIGN §3, pivoted means):
// tile pivot k = T's first row, m = mean(T - k), M2 = sum((T - k) - m)^2, then Chan's merge
// (First: the chunk's first tile, taken whole), and with SqErr sq_err += sum (S - T)^2
// (without it S is not read: the forward's gradient pass sums it, student_grad_chunk).
// frac = R / (count + R), cross = count * frac, count being the chunk's rows so far: the merge
// is chan_merge_nonempty with its count-only factors hoisted out of the loop (calling it per
// dim here made the forward 2x slower, 12 x 1024 x 768 fp32, kernel_floor.py).
// While it reads a line of each row, it prefetches the same line of each row of the next tile
// (next_s, next_t) into L2: the hardware prefetchers do not keep 2R interleaved streams ahead.
// 12 x 1024 x 768 on the 2-core CI machine (benchmarks/kernel_floor.py): the fp32 forward went
// from 1.3-1.6x to ~1.2x the time of a plain read of S and T, the bf16 one from 3.7 to 1.9 ms.
template <int R, bool First, bool SqErr, typename elem_t, typename acc_t>
__attribute__((noinline)) void add_tile(Rows<R, elem_t> s, Rows<R, elem_t> t,
                                        Rows<R, elem_t> next_s, Rows<R, elem_t> next_t,
                                        int64_t d, acc_t frac, acc_t cross,
                                        acc_t* __restrict__ pivot, acc_t* __restrict__ mean,
                                        acc_t* __restrict__ m2, acc_t* __restrict__ sq_err) {
  constexpr acc_t inv_rows = acc_t(1) / R;
  constexpr int64_t kLine = kLineElems<elem_t>;
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
        if constexpr (SqErr) sq_err[j] = sq;
      } else {
        const acc_t delta = (k - pivot[j]) + (m - mean[j]);
        mean[j] += delta * frac;
        m2[j] += dev2 + delta * delta * cross;
        if constexpr (SqErr) sq_err[j] += sq;
      }
    }
  }
}

// The valid rows of a chunk: their S and T row pointers and row indices, in order.
template <typename elem_t>
struct ValidRows {
  const elem_t* s[kChunkRows];
  const elem_t* t[kChunkRows];
  int64_t index[kChunkRows];
  int count = 0;
};

template <typename elem_t>
void gather_valid_rows(const LayerParams& p, int64_t row_begin, int64_t row_end,
                       ValidRows<elem_t>& rows) {
  const auto* S = static_cast<const elem_t*>(p.student);
  const auto* T = static_cast<const elem_t*>(p.teacher);
  for (int64_t r = row_begin; r < row_end; ++r) {
    if (p.mask != nullptr && !p.mask[r]) continue;
    rows.s[rows.count] = S + r * p.student_row;
    rows.t[rows.count] = T + r * p.teacher_row;
    rows.index[rows.count++] = r;
  }
}

// Calls tile(std::integral_constant<int, R>, k, next) for the tiles of n_valid rows:
// kTileRows rows at a time, then the last few one by one (R = 1). k: the tile's first row;
// next: where the next tile starts, relative to k (0 when there is none).
template <typename Tile>
void for_each_tile(int n_valid, const Tile& tile) {
  int k = 0;
  for (; k + kTileRows <= n_valid; k += kTileRows) {
    tile(std::integral_constant<int, kTileRows>{}, k, k + 2 * kTileRows <= n_valid ? kTileRows : 0);
  }
  for (; k < n_valid; ++k) tile(std::integral_constant<int, 1>{}, k, k + 1 < n_valid ? 1 : 0);
}

// Merges the tile of R rows at s_rows / t_rows into the chunk's statistics `out` (laid out as
// in chunk_stats); `count` is the chunk's rows so far. `next` is where the next tile starts in
// the row arrays (the tile itself when there is none).
template <int R, bool SqErr, typename elem_t, typename acc_t>
void merge_tile(const elem_t* const* s_rows, const elem_t* const* t_rows, int next, int64_t d,
                acc_t count, acc_t* out) {
  const auto s = rows_at<R>(s_rows);
  const auto t = rows_at<R>(t_rows);
  const auto next_s = rows_at<R>(s_rows + next);
  const auto next_t = rows_at<R>(t_rows + next);
  acc_t* pivot = out;
  acc_t* mean = out + d;
  acc_t* m2 = out + 2 * d;
  acc_t* sq_err = out + 3 * d;
  if (count == 0) {
    add_tile<R, true, SqErr>(s, t, next_s, next_t, d, acc_t(0), acc_t(0), pivot, mean, m2, sq_err);
  } else {
    const acc_t frac = acc_t(R) / (count + acc_t(R));
    add_tile<R, false, SqErr>(s, t, next_s, next_t, d, frac, count * frac, pivot, mean, m2, sq_err);
  }
}

// Statistics of rows [row_begin, row_end) (at most kChunkRows) of one layer into `out`:
// [pivot | mean offset | M2 | sum (S - T)^2] (d each; the sum only with SqErr), then the
// valid-token count. Valid rows are merged kTileRows at a time; the last few one by one (a
// one-row tile is Welford's update).
template <bool SqErr, typename elem_t, typename acc_t>
void chunk_stats(const LayerParams& p, int64_t row_begin, int64_t row_end, acc_t* out) {
  ValidRows<elem_t> rows;
  gather_valid_rows(p, row_begin, row_end, rows);
  if (rows.count == 0) std::fill(out, out + 4 * p.d, acc_t(0));  // else the first tile writes
  for_each_tile(rows.count, [&](auto tile_rows, int k, int next) {
    merge_tile<decltype(tile_rows)::value, SqErr>(rows.s + k, rows.t + k, next, p.d,
                                                  static_cast<acc_t>(k), out);
  });
  out[4 * p.d] = static_cast<acc_t>(rows.count);
}

// Merges a layer's chunk partials in chunk order (fp64) into its moments and finalizes the
// weights and the dS coefficients into `stats` (kDimFields rows of max_d; every field is zero
// past the layer's d, as the buffer is not zeroed). Returns the weights' scale, sbar + eps.
// A chunk's token count is the same for all its dims, so the merge goes chunk by chunk over
// vectors of dims (per dim, it was 5% of the forward's samples at BERT-base B=8).
template <typename acc_t>
double finalize_moments(const LayerParams& p, const acc_t* partials, int64_t num_chunks,
                        double power, double eps, double* stats, int64_t max_d) {
  const int64_t d = p.d;
  auto field = [&](DimField f) { return stats + f * max_d; };
  double* __restrict__ pivot = field(kPivot);
  double* __restrict__ mean = field(kMean);
  double* __restrict__ m2 = field(kSigma);  // M2 until it becomes sigma below
  double count = 0;
  const acc_t* part = partials;
  for (int64_t c = 0; c < num_chunks; ++c, part += 4 * d + 1) {
    const double chunk_count = part[4 * d];
    if (chunk_count == 0) continue;
    if (count == 0) {
      for (int64_t j = 0; j < d; ++j) {
        pivot[j] = part[j];
        mean[j] = part[d + j];
        m2[j] = part[2 * d + j];
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        Moments<double> acc{count, pivot[j], mean[j], m2[j]};
        chan_merge_nonempty(acc, Moments<double>{chunk_count, part[j], part[d + j],
                                                 part[2 * d + j]});
        mean[j] = acc.mean;
        m2[j] = acc.m2;
      }
    }
    count += chunk_count;
  }
  if (count == 0) {  // every token masked: zeros, and NaN weights below (n' < 2, DESIGN §1)
    for (double* row : {pivot, mean, m2}) std::fill(row, row + d, 0.0);
  }
  double sigma_sum = 0;
  for (int64_t j = 0; j < d; ++j) {
    field(kCount)[j] = count;
    m2[j] = std::sqrt(m2[j] / (count - 1.0));
    sigma_sum += m2[j];
  }
  const double scale = sigma_sum / d + eps;
  const double inv_nd = 1.0 / (count * d);
  for (int64_t j = 0; j < d; ++j) {
    const double w = eofd_weight(field(kSigma)[j], scale, power);
    field(kWeight)[j] = w;
    field(kCoefS)[j] = 2.0 * w * inv_nd;
  }
  for (int f = 0; f < kDimFields; ++f) {
    std::fill(field(static_cast<DimField>(f)) + d, field(static_cast<DimField>(f)) + max_d, 0.0);
  }
  return scale;
}

// The rest of a layer's finalize, once its chunks' sums of (S - T)^2 are in: merges them in
// chunk order into `stats`, and finalizes the dT coefficients and the loss (returned).
template <typename acc_t>
double finalize_loss(const LayerParams& p, const acc_t* partials, int64_t num_chunks,
                     double power, double scale, double* stats, int64_t max_d) {
  const int64_t d = p.d;
  auto field = [&](DimField f) { return stats + f * max_d; };
  double* __restrict__ sq_err = field(kSqErr);
  std::fill(sq_err, sq_err + d, 0.0);
  const acc_t* part = partials;
  for (int64_t c = 0; c < num_chunks; ++c, part += 4 * d + 1) {
    if (part[4 * d] == 0) continue;  // masked rows only: nothing to add
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) sq_err[j] += part[3 * d + j];
  }
  const double n_valid = field(kCount)[0];
  const double inv_nd = 1.0 / (n_valid * d);
  double weighted = 0;
  for (int64_t j = 0; j < d; ++j) weighted += field(kWeight)[j] * sq_err[j];
  const double mean_term = weighted / (d * scale);
  for (int64_t j = 0; j < d; ++j) {
    field(kCoefT)[j] = eofd_coef_teacher(field(kWeight)[j], sq_err[j], field(kSigma)[j],
                                         n_valid, static_cast<double>(d), power, mean_term);
  }
  return weighted * inv_nd;
}

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
// row (3 KB at d = 768) after computing it stalled on the write-combining buffers, 1.35x slower
// (12 x 1024 x 768 fp32 on the 2-core CI machine: 2.9 vs 2.2 ms, 60 interleaved reps).
constexpr int64_t kPieceElems = 64;

// dS (and dT when `dt` is not null) of one valid row. With AddSquares (dS only), also
// sq[j] += (S - T)^2.
template <bool AddSquares, typename elem_t, typename acc_t>
void backward_row(const BackwardCoefs<acc_t>& c, const elem_t* s, const elem_t* t, elem_t* ds,
                  elem_t* dt, int64_t d, acc_t* __restrict__ sq = nullptr) {
  alignas(64) elem_t ds_piece[kPieceElems];
  alignas(64) elem_t dt_piece[kPieceElems];
  for (int64_t j0 = 0; j0 < d; j0 += kPieceElems) {
    const int64_t width = std::min(kPieceElems, d - j0);
    const elem_t* __restrict__ sj = s + j0;
    const elem_t* __restrict__ tj = t + j0;
    const acc_t* __restrict__ coef_s = c.coef_s + j0;
    if (dt == nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const acc_t e = widen(sj[j]) - widen(tj[j]);
        ds_piece[j] = narrow<elem_t>(coef_s[j] * e);
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
        ds_piece[j] = narrow<elem_t>(g_s);
        dt_piece[j] = narrow<elem_t>(coef_t[j] * ((t_j - pivot[j]) - mean[j]) - g_s);
      }
      stream_copy(dt + j0, dt_piece, width * sizeof(elem_t));
    }
    stream_copy(ds + j0, ds_piece, width * sizeof(elem_t));
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
    coefs[3 * max_d + j] = static_cast<acc_t>(stats[kMean * max_d + j]);
  }
}

// dS (and dT when need_teacher_grad) of the rows of chunk `ch`, from fill_coefs' vectors.
template <typename elem_t, typename acc_t>
void backward_chunk(const LayerParams& p, const Chunk& ch, const acc_t* coefs, int64_t max_d,
                    bool need_teacher_grad) {
  const BackwardCoefs<acc_t> c{coefs, coefs + max_d, coefs + 2 * max_d, coefs + 3 * max_d};
  const int64_t d = p.d;
  for (int64_t r = ch.row_begin; r < ch.row_end; ++r) {
    auto* ds = static_cast<elem_t*>(p.grad_student) + r * d;
    auto* dt = need_teacher_grad ? static_cast<elem_t*>(p.grad_teacher) + r * d : nullptr;
    if (p.mask != nullptr && !p.mask[r]) {
      std::fill(ds, ds + d, narrow<elem_t>(acc_t(0)));
      if (dt != nullptr) std::fill(dt, dt + d, narrow<elem_t>(acc_t(0)));
      continue;
    }
    backward_row<false>(c, static_cast<const elem_t*>(p.student) + r * p.student_row,
                        static_cast<const elem_t*>(p.teacher) + r * p.teacher_row, ds, dt, d);
  }
}

// The forward's gradient pass over a chunk's valid rows, row by row (see student_grad_chunk):
// dS from g * coef_s, and each tile's squares summed into an L1 buffer, then into sq_err.
template <typename elem_t, typename acc_t>
void student_grad_rows(const LayerParams& p, const ValidRows<elem_t>& rows, const acc_t* coef_s,
                       acc_t* sq_err) {
  const BackwardCoefs<acc_t> c{coef_s, nullptr, nullptr, nullptr};
  const int64_t d = p.d;
  auto* dS = static_cast<elem_t*>(p.grad_student);
  std::vector<acc_t> tile_sq(d);
  for_each_tile(rows.count, [&](auto tile_rows, int k, int) {
    std::fill(tile_sq.begin(), tile_sq.end(), acc_t(0));
    for (int q = k; q < k + decltype(tile_rows)::value; ++q) {
      backward_row<true, elem_t>(c, rows.s[q], rows.t[q], dS + rows.index[q] * d, nullptr, d,
                                 tile_sq.data());
    }
    if (k == 0) {
      std::copy(tile_sq.begin(), tile_sq.end(), sq_err);
    } else {
      for (int64_t j = 0; j < d; ++j) sq_err[j] += tile_sq[j];
    }
  });
}

// dS of a tile of R valid rows (ds: their dS rows), and its sum of (S - T)^2 merged into the
// chunk's sq_err as add_tile merges it (First: the chunk's first tile). A piece of each row is
// computed into an L1 buffer and streamed out; the squares stay in registers. Like add_tile,
// it prefetches the next tile's rows into L2.
template <int R, bool First, typename elem_t, typename acc_t>
__attribute__((noinline)) void student_grad_tile(Rows<R, elem_t> s, Rows<R, elem_t> t,
                                                 Rows<R, elem_t> next_s, Rows<R, elem_t> next_t,
                                                 elem_t* const* ds, const acc_t* coef_s,
                                                 int64_t d, acc_t* __restrict__ sq_err) {
  alignas(64) elem_t piece[R][kPieceElems];
  for (int64_t j0 = 0; j0 < d; j0 += kPieceElems) {
    const int64_t width = std::min(kPieceElems, d - j0);
    for (int64_t line = j0; line < j0 + width; line += kLineElems<elem_t>) {
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
        piece[q][j] = narrow<elem_t>(coef * e);
        sq += e * e;
      }
      if constexpr (First) {
        sq_err[j0 + j] = sq;
      } else {
        sq_err[j0 + j] += sq;
      }
    }
    for (int q = 0; q < R; ++q) stream_copy(ds[q] + j0, piece[q], width * sizeof(elem_t));
  }
}

// The forward's gradient pass over a chunk's valid rows, a tile at a time (see
// student_grad_chunk).
template <typename elem_t, typename acc_t>
void student_grad_tiles(const LayerParams& p, const ValidRows<elem_t>& rows,
                        const acc_t* coef_s, acc_t* sq_err) {
  const int64_t d = p.d;
  auto* dS = static_cast<elem_t*>(p.grad_student);
  elem_t* ds_rows[kChunkRows];
  for (int k = 0; k < rows.count; ++k) ds_rows[k] = dS + rows.index[k] * d;
  for_each_tile(rows.count, [&](auto tile_rows, int k, int next) {
    constexpr int R = decltype(tile_rows)::value;
    const auto s = rows_at<R>(rows.s + k);
    const auto t = rows_at<R>(rows.t + k);
    const auto next_s = rows_at<R>(rows.s + k + next);
    const auto next_t = rows_at<R>(rows.t + k + next);
    if (k == 0) {
      student_grad_tile<R, true>(s, t, next_s, next_t, ds_rows + k, coef_s, d, sq_err);
    } else {
      student_grad_tile<R, false>(s, t, next_s, next_t, ds_rows + k, coef_s, d, sq_err);
    }
  });
}

// The forward's gradient pass over chunk `ch`: dS from g * coef_s (zeros for masked rows), and
// the sum of (S - T)^2 that its statistics chunk left out, into the chunk's partial. The sum
// goes in chunk_stats' tiles (kTileRows valid rows, then single rows; a tile's squares summed
// in row order, then added to the chunk's), so it has the bits of the forward without
// gradients. Two loop orders, each the faster for its element size
// (forward_and_grad op at BERT-base B=8, interleaved, each right after the eager reference,
// median ms): 16-bit elements go a tile at a time with the squares in registers (bf16: 2.73
// and 3.20 vs 3.18 and 3.79 row by row), wider ones row by row, where two read streams beat
// the tile's 16 (fp32: 4.33 and 4.70 vs 4.89 and 5.27 by tiles).
template <typename elem_t, typename acc_t>
void student_grad_chunk(const LayerParams& p, const Chunk& ch, const acc_t* coef_s,
                        acc_t* partial) {
  const int64_t d = p.d;
  if (p.mask != nullptr) {
    auto* dS = static_cast<elem_t*>(p.grad_student);
    for (int64_t r = ch.row_begin; r < ch.row_end; ++r) {
      if (!p.mask[r]) std::fill(dS + r * d, dS + (r + 1) * d, narrow<elem_t>(acc_t(0)));
    }
  }
  ValidRows<elem_t> rows;
  gather_valid_rows(p, ch.row_begin, ch.row_end, rows);
  if constexpr (sizeof(elem_t) == 2) {
    student_grad_tiles(p, rows, coef_s, partial + 3 * d);
  } else {
    student_grad_rows(p, rows, coef_s, partial + 3 * d);
  }
}

template <typename scalar_t>
void backward_impl(const LayerTable& table, const std::vector<double>& grads,
                   const at::Tensor& dim_stats, bool need_teacher_grad) {
  using acc_t = acc_type<scalar_t>;
  const int64_t num_layers = table.layers.size();
  const int64_t max_d = table.max_d;
  std::vector<acc_t> coefs(num_layers * 4 * max_d);
  for (int64_t l = 0; l < num_layers; ++l) {
    fill_coefs(dim_stats.data_ptr<double>() + l * kDimFields * max_d, grads[l], max_d,
               coefs.data() + l * 4 * max_d);
  }
  int64_t unused = 0;
  const std::vector<Chunk> chunks = make_chunks(table, &unused);
  parallel_over_chunks(
      static_cast<int64_t>(chunks.size()),
      [&](int64_t i) {
        const Chunk& ch = chunks[i];
        backward_chunk<element_t<scalar_t>>(table.layers[ch.layer], ch,
                                            coefs.data() + ch.layer * 4 * max_d, max_d,
                                            need_teacher_grad);
      },
      stream_fence);
}

// Start chunk of each layer in make_chunks' list, and the total at the end (L + 1 values).
std::vector<int64_t> first_chunks(const std::vector<Chunk>& chunks, int64_t num_layers) {
  std::vector<int64_t> first(num_layers + 1, 0);
  for (const Chunk& c : chunks) first[c.layer + 1]++;
  for (int64_t l = 0; l < num_layers; ++l) first[l + 1] += first[l];
  return first;
}

// One past the last layer of each group of consecutive layers whose S and T fit group_bytes
// (a larger layer is a group of its own).
template <typename elem_t>
std::vector<int64_t> group_ends(const LayerTable& table, int64_t group_bytes) {
  const int64_t num_layers = table.layers.size();
  auto layer_bytes = [&](int64_t l) {
    return 2 * table.layers[l].n * table.layers[l].d * static_cast<int64_t>(sizeof(elem_t));
  };
  std::vector<int64_t> ends;
  for (int64_t end = 0; end < num_layers;) {
    int64_t bytes = layer_bytes(end++);
    while (end < num_layers && bytes + layer_bytes(end) <= group_bytes) bytes += layer_bytes(end++);
    ends.push_back(end);
  }
  return ends;
}

// The forward's work items in claim order: a chunk index for a statistics chunk, ~index for a
// gradient chunk. Group g's statistics chunks alternate with group g - 1's gradient chunks,
// `lead` (>= 1, the thread count) statistics chunks ahead: right after a group's last
// statistics chunk is claimed, every other thread's next claim is a statistics chunk, not a
// gradient chunk that must wait for that group's finalize. Interleaved in one process at
// BERT-base, the gradient chunk first made the step 4-8% slower at B=8 fp32, a lead of 1
// instead of 2 up to ~5-9% slower at B=2 fp32 and B=8 bf16. At most two groups are in
// flight, so the gradient chunks find T still in L3. Without gradients: the statistics
// chunks.
std::vector<int64_t> claim_order(const std::vector<int64_t>& first_chunk,
                                 const std::vector<int64_t>& group_end, bool with_grads,
                                 int64_t lead) {
  std::vector<int64_t> order;
  int64_t prev_begin = 0, prev_end = 0;  // the group whose gradient chunks are due
  for (size_t g = 0; g <= group_end.size(); ++g) {
    const int64_t begin = prev_end;
    const int64_t end = g < group_end.size() ? group_end[g] : begin;
    const int64_t s0 = first_chunk[begin], ns = first_chunk[end] - s0;
    const int64_t g0 = first_chunk[prev_begin];
    const int64_t ng = with_grads ? first_chunk[prev_end] - g0 : 0;
    for (int64_t k = 0; k < std::max(ns, ng + lead - 1); ++k) {
      if (k < ns) order.push_back(s0 + k);
      const int64_t j = k + 1 - lead;  // the gradient chunk after statistics chunk k
      if (j >= 0 && j < ng) order.push_back(~(g0 + j));
    }
    prev_begin = begin;
    prev_end = end;
  }
  return order;
}

// The forward. With group_bytes > 0 it also writes dS for the incoming grads `grads` (one per
// layer; the backward's formula and bits) into the table's grad_student buffers. Then a
// layer's statistics chunks read only T, and its gradient chunks read S from memory and reread
// T from L3 shortly after (groups of at most group_bytes, claim_order), writing dS and summing
// (S - T)^2 for the loss, which the last of them finalizes. A training step then reads S and T
// from memory once, not twice as DESIGN §3's separate backward does (BERT-base B=8 fp32 step:
// 6.3 -> 5.3 ms), and rereads only T from L3. Against rereading S and T (interleaved in one
// process, each op right after the eager reference, median ms) the op went from 5.28, 5.01,
// 5.32 to 5.13, 4.92, 4.72 at B=8 fp32 and from 3.14, 3.44, 3.45 to 2.79, 3.30, 3.26 at B=8
// bf16; at B=2 (one run) 1.55 -> 1.45 fp32, 1.06 -> 1.08 bf16. The caller picks group_bytes
// from the cache size (ext_op.py).
// One parallel region, no barriers: the thread that finishes a layer's last statistics chunk
// finalizes the layer's moments and weights, and a gradient chunk waits for that. Every
// statistics chunk of a layer is claimed before any of its gradient chunks, so a wait is on
// running work, never on unclaimed work (one thread alone runs the items in order). Against a
// barrier after each group's statistics and gradient pass, this made the training step ~10%
// faster at BERT-base B=2 fp32 and B=8 bf16 (few chunks per pass: one thread idled at each
// barrier); B=8 fp32, bound by memory, did not change.
template <typename scalar_t>
void forward_impl(const LayerTable& table, double power, double eps, int64_t group_bytes,
                  const std::vector<double>& grads, at::Tensor& losses, at::Tensor& dim_stats) {
  using acc_t = acc_type<scalar_t>;
  using elem_t = element_t<scalar_t>;
  int64_t workspace_size = 0;
  const std::vector<Chunk> chunks = make_chunks(table, &workspace_size);
  // Every partial is written in full before it is read: no zeroing, and pooled pages that are
  // already faulted in (a fresh zeroed vector was ~3% of the forward's samples at BERT-base B=8).
  const at::Tensor workspace_buffer = OutputPool::instance()->empty(
      {workspace_size}, c10::CppTypeToScalarType<acc_t>::value);
  acc_t* const workspace = static_cast<acc_t*>(workspace_buffer.data_ptr());
  const int64_t num_layers = table.layers.size();
  const int64_t max_d = table.max_d;
  const bool with_grads = group_bytes > 0;
  const std::vector<int64_t> first_chunk = first_chunks(chunks, num_layers);
  const std::vector<int64_t> order = claim_order(
      first_chunk, with_grads ? group_ends<elem_t>(table, group_bytes)
                              : std::vector<int64_t>{num_layers},
      with_grads, at::get_num_threads());
  double* stats = dim_stats.data_ptr<double>();
  std::vector<double> layer_loss(num_layers);
  std::vector<acc_t> coef_s(with_grads ? num_layers * max_d : 0);
  std::vector<double> scale(num_layers);
  auto partials = [&](int64_t l) { return workspace + chunks[first_chunk[l]].offset; };
  auto num_chunks = [&](int64_t l) { return first_chunk[l + 1] - first_chunk[l]; };
  auto layer_stats = [&](int64_t l) { return stats + l * kDimFields * max_d; };
  // Chunks not done per layer: statistics chunks, then gradient chunks.
  std::vector<std::atomic<int64_t>> stats_left(num_layers), grads_left(num_layers);
  std::vector<std::atomic<bool>> finalized(num_layers);
  for (int64_t l = 0; l < num_layers; ++l) {
    stats_left[l].store(num_chunks(l), std::memory_order_relaxed);
    grads_left[l].store(num_chunks(l), std::memory_order_relaxed);
    finalized[l].store(false, std::memory_order_relaxed);
  }
  auto finalize_loss_of = [&](int64_t l) {
    layer_loss[l] = finalize_loss(table.layers[l], partials(l), num_chunks(l), power, scale[l],
                                  layer_stats(l), max_d);
  };
  auto finalize = [&](int64_t l) {  // the last statistics chunk of layer l is done
    scale[l] = finalize_moments(table.layers[l], partials(l), num_chunks(l), power, eps,
                                layer_stats(l), max_d);
    if (!with_grads) return finalize_loss_of(l);
    fill_student_coefs(layer_stats(l), grads[l], max_d, coef_s.data() + l * max_d);
    finalized[l].store(true, std::memory_order_release);
  };
  parallel_over_chunks(
      static_cast<int64_t>(order.size()),
      [&](int64_t i) {
        const bool is_grad = order[i] < 0;
        const Chunk& c = chunks[is_grad ? ~order[i] : order[i]];
        const LayerParams& p = table.layers[c.layer];
        if (is_grad) {
          while (!finalized[c.layer].load(std::memory_order_acquire)) spin_pause();
          student_grad_chunk<elem_t>(p, c, coef_s.data() + c.layer * max_d,
                                     workspace + c.offset);
          if (grads_left[c.layer].fetch_sub(1, std::memory_order_acq_rel) == 1) {
            finalize_loss_of(c.layer);
          }
          return;
        }
        if (with_grads) {
          chunk_stats<false, elem_t>(p, c.row_begin, c.row_end, workspace + c.offset);
        } else {
          chunk_stats<true, elem_t>(p, c.row_begin, c.row_end, workspace + c.offset);
        }
        if (stats_left[c.layer].fetch_sub(1, std::memory_order_acq_rel) == 1) finalize(c.layer);
      },
      stream_fence);
  losses.copy_(at::tensor(layer_loss, at::kDouble));
}

at::ScalarType result_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor pooled_empty_like(const at::Tensor& x) {
  return OutputPool::instance()->empty(x.sizes(), x.scalar_type());
}

// Losses (L,) in the result dtype and dim_stats; dS for `grads` too when group_bytes > 0
// (into the table's grad_student buffers, allocated by the caller).
std::tuple<at::Tensor, at::Tensor> run_forward(const LayerTable& table, double power, double eps,
                                               int64_t group_bytes,
                                               const std::vector<double>& grads = {}) {
  const int64_t num_layers = table.layers.size();
  // From the pool: at d = 4096 and 48 layers a fresh zeroed 12.6 MB buffer per call cost ~1 ms
  // of page faults and memset; finalize writes every element.
  auto dim_stats = OutputPool::instance()->empty({num_layers, kDimFields, table.max_d},
                                                 at::kDouble);
  auto losses = at::empty({num_layers}, at::kDouble);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.dtype, "eofd_forward_cpu", [&] {
    forward_impl<scalar_t>(table, power, eps, group_bytes, grads, losses, dim_stats);
  });
  return {losses.to(result_dtype(table.dtype)), dim_stats};
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(
    at::TensorList students, at::TensorList teachers,
    const c10::List<std::optional<at::Tensor>>& masks, double power, double eps) {
  return run_forward(make_layer_table(students, teachers, masks), power, eps, 0);
}

// grad_losses (already checked against the layer count) as host fp64 values.
std::vector<double> host_grads(const at::Tensor& grad_losses) {
  const at::Tensor g = grad_losses.to(at::kDouble).contiguous();
  return {g.data_ptr<double>(), g.data_ptr<double>() + g.numel()};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> forward_and_grad_cpu(
    at::TensorList students, at::TensorList teachers,
    const c10::List<std::optional<at::Tensor>>& masks, double power, double eps,
    const at::Tensor& grad_losses, int64_t group_bytes) {
  TORCH_CHECK(group_bytes > 0, "eofd_ext::forward_and_grad: group_bytes must be positive, got ",
              group_bytes);
  LayerTable table = make_layer_table(students, teachers, masks);
  check_grad_losses(table, grad_losses);
  const std::vector<double> grads = host_grads(grad_losses);
  auto d_students = std::get<0>(allocate_grads(table, students, teachers, false,
                                               pooled_empty_like));
  auto [losses, dim_stats] = run_forward(table, power, eps, group_bytes, grads);
  return {losses, dim_stats, d_students};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> backward_cpu(
    const at::Tensor& grad_losses, at::TensorList students, at::TensorList teachers,
    const c10::List<std::optional<at::Tensor>>& masks, const at::Tensor& dim_stats,
    bool need_teacher_grad) {
  LayerTable table = make_layer_table(students, teachers, masks);
  check_backward_inputs(table, grad_losses, dim_stats);
  const std::vector<double> grads = host_grads(grad_losses);
  auto grads_out = allocate_grads(table, students, teachers, need_teacher_grad,
                                  pooled_empty_like);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.dtype, "eofd_backward_cpu",
                                  [&] {
                                    backward_impl<scalar_t>(table, grads, dim_stats,
                                                            need_teacher_grad);
                                  });
  return grads_out;
}

}  // namespace

TORCH_LIBRARY_IMPL(eofd_ext, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("forward_and_grad", &forward_and_grad_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace eofd
