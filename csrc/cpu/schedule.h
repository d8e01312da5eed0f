// How the CPU ops spread chunks over threads, and the training forward's claim order
// (docs/design.md, "The CPU training step"). Which thread runs a chunk never changes a
// result: each chunk owns its output, and partials are merged in chunk order.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "tiles.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace eofd {

// Runs fn(i) for every chunk i on ATen's threads, each thread claiming the next chunk when it is
// free; `done()` then runs once on every thread that took part. Chunks are equal work but the
// cores are not equally fast (memory, a neighbour's load), and a static split leaves threads
// waiting at the barrier. Which thread runs a chunk never changes the result.
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

// Start chunk of each layer in make_chunks' list, and the total at the end (L + 1 values).
inline std::vector<int64_t> first_chunks(const std::vector<Chunk>& chunks, int64_t num_layers) {
  std::vector<int64_t> first(num_layers + 1, 0);
  for (const Chunk& c : chunks) first[c.layer + 1]++;
  for (int64_t l = 0; l < num_layers; ++l) first[l + 1] += first[l];
  return first;
}

// One past the last layer of each group of consecutive layers whose S and T fit group_bytes
// (a larger layer is a group of its own).
inline std::vector<int64_t> group_ends(const LayerTable& table, int64_t group_bytes) {
  const int64_t num_layers = table.layers.size();
  const int64_t pair_bytes = static_cast<int64_t>(c10::elementSize(table.student_dtype) +
                                                  c10::elementSize(table.teacher_dtype));
  auto layer_bytes = [&](int64_t l) { return table.layers[l].n * table.layers[l].d * pair_bytes; };
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
// gradient chunk that must wait for that group's finalize (docs/performance.md: the effect
// of both choices). At most two groups are in flight, so the gradient chunks
// find T still in L3. Without gradients: the statistics chunks.
inline std::vector<int64_t> claim_order(const std::vector<int64_t>& first_chunk,
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

}  // namespace eofd
