// The CPU kernels' unit of work and its rows: fixed chunks of kChunkRows token rows per
// layer (never split by thread count, so the bits never depend on it), the valid rows of a
// chunk, and their tiles of kTileRows rows, whose statistics are computed in registers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../include/chunk_policy.h"
#include "../include/dtype_pairs.h"
#include "../layer_table.h"

namespace eofd {

constexpr int64_t kChunkRows = kCpuChunkRows;

struct Chunk {
  int64_t layer, row_begin, row_end, offset;  // offset of its partial in the workspace
};

// Chunks of every layer, and the size of the partials workspace (4 d + 1 values per chunk).
inline std::vector<Chunk> make_chunks(const LayerTable& table, int64_t* workspace) {
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

// Rows per tile: the tile's exact two-pass statistics are computed in registers (each vector of
// dims holds its kTileRows values of T), so S and T are read from memory once.
constexpr int kTileRows = 8;

// R row pointers, passed by value: GCC then keeps them in registers; read through an array in
// memory it re-loads them in the loop and vectorizes the rows' loads as gathers (far slower).
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

// Elements of a row per 64-byte cache line of the wider of S and T (s_elem, t_elem): the tile
// loop goes a line of every row at a time (a narrower side's line is then prefetched twice,
// which costs less than leaving every other line of the wider side unprefetched).
template <typename s_elem, typename t_elem>
constexpr int64_t kLineElems = 64 / std::max(sizeof(s_elem), sizeof(t_elem));

// The valid rows of a chunk: their S and T row pointers and row indices, in order.
template <typename s_elem, typename t_elem>
struct ValidRows {
  const s_elem* s[kChunkRows];
  const t_elem* t[kChunkRows];
  int64_t index[kChunkRows];
  int count = 0;
};

template <typename s_elem, typename t_elem>
void gather_valid_rows(const LayerParams& p, int64_t row_begin, int64_t row_end,
                       ValidRows<s_elem, t_elem>& rows) {
  const auto* S = static_cast<const s_elem*>(p.student);
  const auto* T = static_cast<const t_elem*>(p.teacher);
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

}  // namespace eofd
