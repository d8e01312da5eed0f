// eofd-kernels: how many token rows one chunk of the statistics pass may hold. Shared by the
// CPU and CUDA launchers (and mirrored by the Triton launcher); torch-free.
//
// A chunk's moments and sum of (S - T)^2 accumulate in fp32 for fp16/bf16/fp32 inputs, and
// chunks merge in fp64. An fp32 running sum over n terms loses ~sqrt(n) ulps in practice (a
// numpy emulation of the CUDA stats kernel's per-thread arithmetic: squared_error relative error
// 3e-7 at n = 4096, 1e-6 at 32768, 2.8e-6 at 131072), so no chunk may hold more than
// kMaxChunkRows rows, whatever the grid would like: fp32 inputs then meet 1e-6 at any n.
#pragma once

#include <cstdint>

namespace eofd {

constexpr int64_t kMaxChunkRows = 1024;

// The CPU ops' fixed chunk (work unit of a thread; never split by thread count).
constexpr int64_t kCpuChunkRows = 256;
static_assert(kCpuChunkRows <= kMaxChunkRows, "CPU chunks must respect the fp32 bound");

// Tiles of `tile_rows` rows per chunk when the launcher would like `wanted_chunks` chunks
// over `tiles` tiles: as few chunks as it asks for, but never more than kMaxChunkRows rows in
// one (and at least one tile).
constexpr int64_t tiles_per_chunk(int64_t tiles, int64_t tile_rows, int64_t wanted_chunks) {
  const int64_t cap = kMaxChunkRows / tile_rows > 1 ? kMaxChunkRows / tile_rows : 1;
  const int64_t wanted = wanted_chunks > 1 ? wanted_chunks : 1;
  const int64_t even = (tiles + wanted - 1) / wanted;
  return even < 1 ? 1 : (even > cap ? cap : even);
}

}  // namespace eofd
