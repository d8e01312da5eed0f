// The CUDA launches' shape and constants: GPU-only, torch-free (the glue and the kernels both
// include it; the shared header eofd_params.h holds only what the CPU code needs too).
#pragma once

#include <cstdint>

#include "../include/chunk_policy.h"

namespace eofd {

// Element type of a call's hidden states (the CUDA launchers take no torch types).
enum class DType : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

// Grid of the stats and backward launches: (num_chunks, dim blocks, layers); each chunk is
// kRowGroups * kRowsPerThread * tiles_per_chunk rows of every layer.
struct LaunchShape {
  int64_t num_chunks;
  int64_t tiles_per_chunk;
  int64_t max_n;
  int64_t max_d;
  int num_layers;
};

constexpr int kRowGroups = 8;       // threadIdx.y
constexpr int kRowsPerThread = 4;   // a thread's tile: kRowsPerThread rows x one 16-byte vector
constexpr int kDimThreads = 32;     // threadIdx.x

}  // namespace eofd
