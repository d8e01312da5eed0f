// The CUDA launches' shape, constants and grid heuristic: GPU-only but torch- and CUDA-free
// (the glue, the kernels and a g++ test all include it; the shared header eofd_params.h holds
// only what the CPU code needs too).
#pragma once

#include <cstdint>

#include "../include/chunk_policy.h"

namespace eofd {

// Which hot kernel a launch runs.
enum class Pass : int { kStats, kBackward };

constexpr int kRowGroups = 8;       // threadIdx.y
constexpr int kRowsPerThread = 4;   // a thread's tile: kRowsPerThread rows x one 16-byte vector
constexpr int kDimThreads = 32;     // threadIdx.x
constexpr int kBlockThreads = kDimThreads * kRowGroups;
constexpr int64_t kTileRows = int64_t(kRowGroups) * kRowsPerThread;
// The hot kernels are compiled for at least this many resident CTAs per SM: with one, a
// CTA's shared-memory merge or tail leaves the SM without loads in flight.
constexpr int kMinBlocksPerSM = 2;
// Modelled cost of starting a work item (its layer's params, the first loads, the stats
// merge through shared memory), in tiles: what a finer chunking pays per extra item.
constexpr int64_t kItemOverheadTiles = 1;

// Dims of one work item (one 16-byte vector per thread along x; element_size: of the pair's
// promoted type).
constexpr int64_t block_dims(int element_size) { return int64_t(kDimThreads) * (16 / element_size); }

// A launch of the stats or backward kernel. Its work items are (layer, block of dims, chunk of
// rows), numbered layer-major then dim block then chunk; each chunk is tiles_per_chunk tiles
// of kTileRows rows. The grid is persistent: CTA c runs items c, c + grid, c + 2 grid, ...
// (what an item computes never depends on which CTA runs it: the bits stay fixed).
struct LaunchShape {
  int64_t num_chunks;
  int64_t tiles_per_chunk;
  int64_t max_n;
  int64_t max_d;
  int64_t dim_blocks;
  int64_t grid;  // CTAs
  int num_layers;
};

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The launch on `sms` SMs of a kernel with `per_sm` resident CTAs per SM (what its registers
// and shared memory allow). The grid is min(items, per_sm x sms): one whole wave whenever
// there is enough work, so no SM idles while another runs a second wave. The chunk length
// (at most kMaxChunkRows rows: the fp32 bound) is chosen for the kMinBlocksPerSM CTAs per SM
// every fast instance is built for: among the lengths that give every such CTA an item (whole
// waves), or all lengths when none does, the one minimising the modelled time of the busiest
// CTA, rounds x (tiles per item + kItemOverheadTiles); ties go to longer chunks (fewer
// partials to merge). The chunks, and so the bits, depend on shapes and the device only, not
// on which instance runs.
constexpr LaunchShape plan_launch(int64_t max_n, int64_t max_d, int num_layers,
                                  int element_size, int64_t sms, int64_t per_sm) {
  const int64_t tiles = ceil_div(max_n, kTileRows);
  const int64_t dim_blocks = ceil_div(max_d, block_dims(element_size));
  const int64_t planned = sms * kMinBlocksPerSM;
  const int64_t resident = sms * (per_sm > 1 ? per_sm : 1);
  const int64_t cap = tiles_per_chunk(tiles, kTileRows, 1);  // the longest chunk allowed
  const bool fills = tiles * dim_blocks * num_layers >= planned;  // one-tile chunks fill a wave
  int64_t best_tiles = cap, best_cost = -1;
  for (int64_t t = cap; t >= 1; --t) {
    const int64_t items = ceil_div(tiles, t) * dim_blocks * num_layers;
    const int64_t cost = ceil_div(items, planned) * (t + kItemOverheadTiles);
    if ((!fills || items >= planned) && (best_cost < 0 || cost < best_cost)) {
      best_cost = cost;
      best_tiles = t;
    }
  }
  const int64_t chunks = ceil_div(tiles, best_tiles);
  const int64_t items = chunks * dim_blocks * num_layers;
  return LaunchShape{chunks, best_tiles, max_n, max_d, dim_blocks,
                     items < resident ? items : resident, num_layers};
}

}  // namespace eofd
